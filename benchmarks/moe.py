"""Forward+backward time of an upcycled top-2-of-8 MoE layer vs the dense MLP vs transformers' Mixtral block.

    python benchmarks/moe.py [--tokens 4096] [--hidden 512] [--intermediate 1536] [--repeats 7] [--threads N]

All of them run side by side in one process on the same input (``[1, tokens, hidden]``,
float32, CPU; and CUDA when a GPU is present): the dense ``LlamaMLP``; the hf_longctx
``SparseMoeBlock`` upcycled from it (``init="copy"``, a little noise) with the backend ``auto``
picks on that device and with ``grouped_mm``; and ``MixtralSparseMoeBlock`` holding the same
weights, with each of transformers' expert implementations (``eager``: a loop over experts;
``grouped_mm``). Prints a markdown table of medians and ratios to the dense MLP; a top-2 MoE
does 2.0x the dense MLP's FLOPs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from hf_longctx.moe.dispatch import resolve_backend
from hf_longctx.moe.layer import SparseMoeBlock
from hf_longctx.testing import cpu_name, mixtral_block


def fwd_bwd_times(modules: dict[str, torch.nn.Module], x: torch.Tensor, grad: torch.Tensor, repeats: int, device):
    """Median seconds of ``module(x).backward(grad)`` per module, over ``repeats`` rounds after a warm-up
    round; each round runs every module once, so a change in machine load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in modules}
    for step in tqdm(range(repeats + 1), desc=f"timing on {device.type}", disable=None):
        for name, module in modules.items():
            module.zero_grad(set_to_none=True)
            inp = x.detach().requires_grad_()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            module(inp).backward(grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(device: torch.device, args) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate)
    dense = LlamaMLP(config).to(device)
    moe = SparseMoeBlock.from_dense(dense, "gated", num_experts=8, top_k=2, noise=0.01).to(device)
    x = torch.randn(1, args.tokens, args.hidden, device=device)
    grad = torch.randn_like(x)
    # The MoE output must be the Mixtral block's before its time means anything.
    reference = mixtral_block(moe, "eager")
    with torch.no_grad():
        err = (moe(x) - reference(x)).abs().max().item()
    assert err < 1e-4, f"hf_longctx MoE differs from transformers' Mixtral block by {err}"
    grouped = copy.deepcopy(moe)
    grouped.experts.backend = "grouped_mm"
    candidates = {
        "dense MLP (LlamaMLP)": dense,
        f"hf_longctx MoE, top-2 of 8 ({resolve_backend('auto', x, moe.experts.gate_up_proj)})": moe,
        "hf_longctx MoE, grouped_mm backend": grouped,
        "Mixtral block, experts eager": reference,
        "Mixtral block, experts grouped_mm": mixtral_block(moe, "grouped_mm"),
    }
    return list(fwd_bwd_times(candidates, x, grad, args.repeats, device).items())


def table(device: torch.device, rows: list[tuple[str, float]], args) -> str:
    machine = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    dense = rows[0][1]
    lines = [
        f"MoE layer forward+backward, {args.tokens} tokens, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"float32, {device.type} ({machine}{threads}), torch {torch.__version__}, median of {args.repeats}:",
        "",
        "| layer | fwd+bwd ms | vs dense MLP |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {t * 1e3:.1f} | {t / dense:.2f}x |" for name, t in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        print(table(device, run(device, args), args))
        print()


if __name__ == "__main__":
    main()
