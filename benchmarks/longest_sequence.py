"""The longest sequence one GPU fine-tunes, option by option; with several GPUs, context parallelism too.

    python benchmarks/longest_sequence.py [--device cuda] [--layers 4] [--max_tokens 1048576]
    torchrun --nproc_per_node N benchmarks/longest_sequence.py --context_parallel   # N >= 2 GPUs

A Llama-shaped model with SmolLM2-135M's widths (``seq_tiling.smollm2_config``), random bfloat16
weights, one forward + backward of one sequence with labels. For each row of
``seq_tiling.variants`` (plain, + checkpointing, + chunked loss, + tiled MLP, + offload) the
length is doubled from ``--start`` while a step fits in the device's memory, then bisected
to a multiple of ``--multiple`` tokens; the table gives the longest length, the peak device
memory there (``torch.cuda.max_memory_allocated``) and the step time. With ``--context_parallel``
every process holds ``1 / N`` of the sequence (torch's ``context_parallel`` over SDPA, head-tail
sharding, labels shifted before sharding, the chunked loss summed over the ranks): it first checks
the loss and gradients against one GPU computing the whole sequence at ``--check_tokens``, then
searches the longest length with every option on. On a CPU (``--device cpu``) it runs the same
code on small lengths, which is what the tests do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_longctx  # noqa: E402
from seq_tiling import smollm2_config, variants  # noqa: E402

IGNORE_INDEX = -100


def longest(fits: Callable[[int], bool], start: int, limit: int, multiple: int) -> int:
    """The largest multiple of ``multiple`` in [start, limit] for which ``fits`` holds (0 if not even ``start``),
    assuming that it holds up to some length and not beyond: doubling, then bisection."""
    if not fits(start):
        return 0
    good = start
    bad = None
    while bad is None:
        trial = min(good * 2, limit)
        if trial == good:
            return good
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad - good > multiple:
        middle = (good + bad) // 2 // multiple * multiple
        if middle in (good, bad):
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def shift(labels: torch.Tensor) -> torch.Tensor:
    """``labels[:, t + 1]`` at position t (what transformers' Trainer does before sharding)."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].contiguous()


def step(model, tokens: int, device: torch.device, mesh=None) -> dict:
    """One forward + backward of one random sequence; with ``mesh``, this rank's shard under context parallelism."""
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator).to(device)
    positions = torch.arange(tokens, device=device)[None]
    labels = shift(ids)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if mesh is None:
        loss = model(input_ids=ids, position_ids=positions, labels=ids, shift_labels=labels).loss
        loss.backward()
    else:
        import torch.distributed as dist
        from torch.distributed.tensor.experimental import context_parallel

        count = (labels != IGNORE_INDEX).sum()
        with context_parallel(mesh, buffers=[ids, positions, labels], buffer_seq_dims=[1, 1, 1],
                              no_restore_buffers={ids, positions, labels}):
            loss = model(input_ids=ids, position_ids=positions, labels=ids, shift_labels=labels,
                         num_items_in_batch=count).loss  # this shard's sum over the whole sequence's count
            loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"loss": loss.item(), "seconds": seconds, "peak_gib": peak}


def fits(model, tokens: int, device: torch.device, mesh=None, record: dict | None = None) -> bool:
    """Whether a step of ``tokens`` fits in the device's memory (on every rank under context parallelism)."""
    ok = True
    try:
        result = step(model, tokens, device, mesh)
    except torch.OutOfMemoryError:
        ok, result = False, None
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if mesh is not None:
        import torch.distributed as dist

        flag = torch.tensor(int(ok), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    if ok and record is not None:
        record[tokens] = result
    return ok


def build(layers: int, tokens: int, device: torch.device, dtype: torch.dtype, spec: dict | None, mesh=None):
    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config(layers, tokens)).to(device, dtype).train()
    model.config.use_cache = False
    if spec is not None:
        hf_longctx.patch(model, spec)
    if mesh is not None:  # as accelerate does: the sharded positions must not become a document mask, is_causal
        from accelerate.big_modeling import _attach_context_parallel_hooks

        _attach_context_parallel_hooks(model)
    return model


def check_context_parallel(args, device, mesh) -> str:
    """Loss and gradients of one sequence under context parallelism against one device computing it whole."""
    import torch.distributed as dist

    spec = variants(smollm2_config(args.layers, args.check_tokens))[-2][1]  # everything on
    model = build(args.layers, args.check_tokens, device, torch.float32, spec, mesh)
    sharded = step(model, args.check_tokens, device, mesh)
    sharded_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    whole = step(model, args.check_tokens, device)
    worst = max(((sharded_grads[n] - p.grad).abs().max() / p.grad.abs().max()).item()
                for n, p in model.named_parameters())
    loss_error = abs(sharded["loss"] - whole["loss"]) / abs(whole["loss"])
    line = (f"context parallel over {dist.get_world_size()} GPUs at {args.check_tokens} tokens, float32, everything "
            f"on: loss {sharded['loss']:.6f} vs one GPU {whole['loss']:.6f} (relative {loss_error:.2g}), largest "
            f"relative gradient difference {worst:.2g}")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--start", type=int, default=4096)
    parser.add_argument("--max_tokens", type=int, default=2**20)
    parser.add_argument("--multiple", type=int, default=4096)
    parser.add_argument("--context_parallel", action="store_true")
    parser.add_argument("--check_tokens", type=int, default=8192)
    parser.add_argument("--only", nargs="*", help="run only the rows whose names start with these")
    args = parser.parse_args()

    mesh = None
    device = torch.device(args.device)
    if args.context_parallel:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from datetime import timedelta

        # A rank that runs out of memory leaves the others waiting in the ring: fail after minutes, not hang.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=3))
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("cp",))
    main_process = mesh is None or mesh.get_rank() == 0

    def say(line: str) -> None:
        if main_process:
            print(line, flush=True)

    if mesh is not None:
        say(check_context_parallel(args, device, mesh))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(f"\n{name}, torch {torch.__version__}; SmolLM2-135M widths, {args.layers} layers, bfloat16, batch 1"
        f"{f', context parallel over {mesh.size()} GPUs' if mesh is not None else ''}\n")
    say("| options | longest sequence (tokens) | peak memory there (GiB) | step there (s) |")
    say("|---|---:|---:|---:|")
    rows = variants(smollm2_config(args.layers, 1))[:5]
    if mesh is not None:
        rows = rows[-1:]  # everything on
    for row_name, spec, _ in rows:
        if args.only and not any(row_name.startswith(o) for o in args.only):
            continue
        model = build(args.layers, args.max_tokens, device, torch.bfloat16, spec, mesh)
        record: dict[int, dict] = {}
        best = longest(lambda n: fits(model, n, device, mesh, record), args.start, args.max_tokens, args.multiple)
        result = record.get(best, {"peak_gib": float("nan"), "seconds": float("nan")})
        say(f"| {row_name} | {best} | {result['peak_gib']:.1f} | {result['seconds']:.1f} |")
        del model
    if mesh is not None:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
