"""Peak memory of one training step at long context, option by option: checkpointing, chunked loss, tiled MLP, offload.

    python benchmarks/seq_tiling.py [--tokens 8192 16384 32768] [--layers 4 [8]] [--full_logits_max_tokens 8192]

A Llama-shaped model with SmolLM2-135M's widths (hidden 576, intermediate 1536, 9 heads of 64,
3 KV heads, vocabulary 49,152, tied embeddings), ``--layers`` layers, random float32 weights,
built from a config as shipped (``use_cache: true``, so the "plain" row keeps the KV cache that
transformers builds in training unless told otherwise), runs one forward + backward of one
sequence with labels, under torch's ``MemTracker``
(``torch.distributed._tools.mem_tracker``), which counts every tensor by what it is:
parameters, gradients, activations (made in forward and in recomputation) and temporaries
(made in backward). The options are added one at a time, each row keeping the ones above it:

- plain: the model as transformers builds it (full ``[tokens, vocab]`` logits);
- + checkpointing: ``tiling: {mlp: false, checkpointing: true}``;
- + chunked loss: ``loss: {chunk_size: c}``;
- + tiled MLP: ``tiling: {mlp: true, ...}``, tiles of ``hidden_size`` tokens;
- + offload: ``tiling: {offload: true, ...}`` (on a CPU there is nowhere to offload to: no change);

and a reference row, "transformers checkpointing + chunked loss (2,048)": the model's own
``gradient_checkpointing_enable()`` with 2,048-token loss chunks. Tile and chunk sizes follow
the model's widths (``hf_longctx.loss.tiling.default_tile_sizes``). The ratio column divides
the peak's activations + temporaries by the checkpointed layer inputs
(layers x tokens x hidden x 4 bytes), the memory that no option removes. Rows with full
logits above ``--full_logits_max_tokens`` are not run (they need tens of GiB).

With two layer counts (``--layers 4 8``) a second table gives, per option, how much the
activations grow per added layer, in checkpointed inputs (tokens x hidden x 4 bytes): about 1
where only the layer inputs are kept, several where the layers keep their insides (or a KV cache).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import LlamaConfig, LlamaForCausalLM

import hf_longctx
from hf_longctx.loss.tiling import default_tile_sizes

MIB = 2**20


def smollm2_config(layers: int, tokens: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                       max_position_embeddings=tokens, rms_norm_eps=1e-5)  # use_cache: true, as shipped


def variants(config) -> list[tuple[str, dict | None, bool]]:
    """(name, patch spec, transformers' own checkpointing) per row."""
    sizes = default_tile_sizes(config)
    checkpointing = {"mlp": False, "checkpointing": True}
    loss = {"chunk_size": sizes["loss_chunk_size"]}
    tiled = {"mlp": True, "mlp_tile_size": sizes["mlp_tile_size"], "checkpointing": True}
    return [
        ("plain", None, False),
        ("+ checkpointing", {"tiling": checkpointing}, False),
        ("+ chunked loss", {"tiling": checkpointing, "loss": loss}, False),
        ("+ tiled MLP", {"tiling": tiled, "loss": loss}, False),
        ("+ offload", {"tiling": {**tiled, "offload": True}, "loss": loss}, False),
        ("transformers checkpointing + chunked loss (2,048)", {"loss": {"chunk_size": 2048}}, True),
    ]


def measure(model, spec: dict | None, hf_checkpointing: bool, tokens: int) -> dict:
    """One forward + backward of one sequence under MemTracker: the peak's split (MiB) on the model's device, the
    host's peak when the device is an accelerator (where offloaded checkpoints go), and seconds."""
    device = next(model.parameters()).device
    if spec is not None:
        hf_longctx.patch(model, spec)
    if hf_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator).to(device)
    model.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model)
    try:
        with tracker:
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        snapshot = tracker.get_tracker_snapshot("peak")
        peak = next(v for d, v in snapshot.items() if d.type == device.type)
        host = next((v.get("Total", 0) for d, v in snapshot.items() if d.type == "cpu"), 0) if device.type != "cpu" else 0
    finally:
        if hf_checkpointing:
            model.gradient_checkpointing_disable()
        if spec is not None:
            hf_longctx.unpatch(model)
    split = {key: peak.get(key, 0) / MIB for key in ("Parameter", "Gradient", "Activation", "Temp", "Total")}
    return {**split, "host": host / MIB, "seconds": seconds, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--layers", type=int, nargs="+", default=[4],
                        help="one or two layer counts; with two, the growth per layer is printed too")
    parser.add_argument("--full_logits_max_tokens", type=int, default=8192)
    parser.add_argument("--only", nargs="*", help="run only the rows whose names start with these")
    parser.add_argument("--device", default="cpu", help="cuda: the split is the GPU's, offloaded memory in 'host'")
    args = parser.parse_args()
    if len(args.layers) > 2:
        parser.error("--layers takes one or two layer counts")
    device = torch.device(args.device)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    config = smollm2_config(args.layers[0], 1)
    print(f"Machine: {machine}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; SmolLM2-135M widths, {' and '.join(map(str, args.layers))} layers, float32, "
          f"batch 1, use_cache: {config.use_cache}; tiles {default_tile_sizes(config)}\n")
    print("| tokens | options | layers | params (MiB) | grads (MiB) | activations (MiB) | temporaries (MiB) | "
          "act. + temp. / checkpointed inputs | host (MiB) | step (s) | step / plain-or-first | loss |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    activations: dict[tuple[int, str], dict[int, float]] = {}
    for tokens in args.tokens:
        for layers in args.layers:
            torch.manual_seed(0)
            config = smollm2_config(layers, tokens)
            model = LlamaForCausalLM(config).to(device).train()
            inputs_mib = layers * tokens * config.hidden_size * 4 / MIB
            first_seconds = None
            for name, spec, hf_checkpointing in variants(config):
                if args.only and not any(name.startswith(o) for o in args.only):
                    continue
                full_logits = spec is None or "loss" not in spec
                if full_logits and tokens > args.full_logits_max_tokens:
                    print(f"| {tokens} | {name} | {layers} | not run: the full logits are "
                          f"{tokens * config.vocab_size * 4 / 2**30:.1f} GiB | | | | | | | | |", flush=True)
                    continue
                m = measure(model, spec, hf_checkpointing, tokens)
                activations.setdefault((tokens, name), {})[layers] = m["Activation"]
                first_seconds = first_seconds or m["seconds"]
                print(f"| {tokens} | {name} | {layers} | {m['Parameter']:.0f} | {m['Gradient']:.0f} | "
                      f"{m['Activation']:.0f} | {m['Temp']:.0f} | {(m['Activation'] + m['Temp']) / inputs_mib:.2f} | "
                      f"{m['host']:.0f} | {m['seconds']:.1f} | "
                      f"{m['seconds'] / first_seconds:.2f} | {m['loss']:.5f} |", flush=True)
            print(f"| {tokens} | checkpointed inputs ({layers} x {tokens} x {config.hidden_size} x 4 B) | {layers} "
                  f"| | | {inputs_mib:.0f} | | 1.00 | | | | |", flush=True)
            del model
    if len(args.layers) == 2:
        low, high = sorted(args.layers)
        hidden = smollm2_config(low, 1).hidden_size
        print(f"\nActivation growth per layer between {low} and {high} layers, in checkpointed inputs "
              f"(tokens x {hidden} x 4 B):\n")
        print(f"| tokens | options | activations {low} layers (MiB) | activations {high} layers (MiB) | "
              "growth per layer (inputs) |")
        print("|---:|---|---:|---:|---:|")
        for (tokens, name), by_layers in activations.items():
            if low in by_layers and high in by_layers:
                unit = tokens * hidden * 4 / MIB
                growth = (by_layers[high] - by_layers[low]) / (high - low) / unit
                print(f"| {tokens} | {name} | {by_layers[low]:.0f} | {by_layers[high]:.0f} | {growth:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
