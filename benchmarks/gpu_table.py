"""Everything GPU-side in one table: attention kernel, extend prefill, MoE dispatch, tiling memory, longest sequence.

    python benchmarks/gpu_table.py [--out FILE] [--budget 420]     # one CUDA GPU (H100 / H200)
    python benchmarks/gpu_table.py --device cpu --smoke            # every section on CPU-sized inputs

One row per measurement: section, case, this project's figure, the baseline's, their ratio.

- attention: the Triton kernel (bf16, B = 1, H·D = 2048, Hq = Hkv) against SDPA's flash backend, forward and
  backward, causal and a 4k window (SDPA's flash backend has no window: it runs the whole causal attention, what a
  user without the kernel runs), N = 4k..32k, D = 64 and 128; TFLOP/s count visible (query, key) pairs only:
  forward 4·pairs·D, backward 2.5x that. Medians of ``triton.testing.do_bench``.
- extend: a prefill (logits of the last token) of a SmolLM2-widths model (2 layers, bf16) with the
  ``self-extend-4x`` and ``dual-chunk-8k`` presets against the plain model with SDPA, at 32k and 128k: time and
  peak memory (``torch.cuda.max_memory_allocated``).
- moe: ``benchmarks/moe.py``'s forward + backward of the upcycled top-2-of-8 MoE layer against the dense MLP.
- tiling: ``benchmarks/seq_tiling.py``'s MemTracker split for the recipe's options (chunked loss, tiled MLP,
  checkpointing, offload) on a config as shipped (``use_cache: true``) at 16k tokens, 4 and 8 layers: the
  activation growth per layer in checkpointed inputs (target <= 1.15).
- longest: ``benchmarks/longest_sequence.py``'s longest bf16 fine-tune step (plain vs everything on), up to 256k.

Each section runs under what is left of ``--budget`` seconds (the whole run fits 8 minutes on one H100); a case
that does not start in time gets a "skipped: time budget" row, and a section that fails gets a row with its error,
so the table always comes out. ``--smoke`` runs the same code on tiny inputs (on a CPU: the blocked kernel path
against SDPA's math backend); it checks the script, not the numbers.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS: list[tuple[str, str, str, str, str]] = []


def row(section: str, case: str, ours: str, baseline: str, ratio: str = "") -> None:
    ROWS.append((section, case, ours, baseline, ratio))
    print(f"| {section} | {case} | {ours} | {baseline} | {ratio} |", flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device, smoke: bool) -> float:
    if device.type == "cuda" and not smoke:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100)
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


# --------------------------------------------------------------------------------------------- attention


def attention(device, budget: Budget, smoke: bool) -> None:
    from hf_longctx.kernels import flash_attention
    from hf_longctx.kernels.reference import visible

    backend = "triton" if device.type == "cuda" else "blocked"
    sdpa_backend = torch.nn.attention.SDPBackend.FLASH_ATTENTION if device.type == "cuda" else \
        torch.nn.attention.SDPBackend.MATH
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = (256, 512) if smoke else (4096, 8192, 16384, 32768)
    window = 128 if smoke else 4096
    dims = (64, 128)
    for d in dims:
        heads = 2048 // d if not smoke else 2
        for n in lengths:
            for mask, options in (("causal", {}), (f"window {window}", dict(window=window))):
                if budget.left() < 0:
                    row("attention", f"D={d} N={n} {mask}", "skipped: time budget", "")
                    continue
                gen = torch.Generator(device=device).manual_seed(n + d)
                q, k, v = (torch.randn(1, heads, n, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
                           for _ in range(3))
                pos = torch.arange(n)
                pairs = int(visible(pos, pos, causal=True, window=options.get("window"), sink_tokens=0).sum())
                full_pairs = n * (n + 1) // 2
                ours = lambda: flash_attention(q, k, v, backend=backend, **options)  # noqa: E731

                def sdpa():
                    with torch.nn.attention.sdpa_kernel(sdpa_backend):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

                for direction in ("forward", "backward"):
                    if direction == "forward":
                        with torch.no_grad():
                            t_ours, t_sdpa = _time_ms(ours, device, smoke), _time_ms(sdpa, device, smoke)
                        flops = 4 * heads * d
                    else:
                        o1, o2 = ours(), sdpa()
                        g = torch.randn_like(o1)
                        t_ours = _time_ms(lambda: torch.autograd.grad(o1, (q, k, v), g, retain_graph=True), device,
                                          smoke)
                        t_sdpa = _time_ms(lambda: torch.autograd.grad(o2, (q, k, v), g, retain_graph=True), device,
                                          smoke)
                        flops = 2.5 * 4 * heads * d
                    tf_ours = flops * pairs / t_ours / 1e9
                    tf_sdpa = flops * full_pairs / t_sdpa / 1e9
                    row("attention", f"D={d} N={n} {mask} {direction}", f"{t_ours:.2f} ms ({tf_ours:.0f} TFLOP/s)",
                        f"SDPA {sdpa_backend.name.lower()} causal {t_sdpa:.2f} ms ({tf_sdpa:.0f} TFLOP/s)",
                        f"{t_sdpa / t_ours:.2f}x")
                del q, k, v
                if device.type == "cuda":
                    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- extend


def extend(device, budget: Budget, smoke: bool) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_longctx
    from self_extend import SMOLLM2_WIDTHS

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    widths = dict(SMOLLM2_WIDTHS)
    if smoke:
        widths.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, vocab_size=256, max_position_embeddings=128)  # 4x at 512 tokens
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, **widths)
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype, attn_implementation="sdpa")
    plain = plain.to(device).eval()
    presets = {"self-extend-4x": "self-extend-4x", "dual-chunk-8k": "dual-chunk-8k"}
    if smoke:
        presets = {"self_extend": {"extend": {"method": "self_extend", "group_size": 4, "window": 32}},
                   "dual_chunk": {"extend": {"method": "dual_chunk", "chunk_size": 128, "local_size": 32}}}
    lengths = (512,) if smoke else (32768, 131072)

    def prefill(model, ids):
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        start = time.perf_counter()
        with torch.inference_mode():
            model(ids, logits_to_keep=1, use_cache=False)
        _sync(device)
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
        return seconds, peak

    for name, spec in presets.items():
        model = copy.deepcopy(plain)
        hf_longctx.patch(model, spec)
        for n in lengths:
            if budget.left() < 0:
                row("extend prefill", f"{name} N={n}", "skipped: time budget", "")
                continue
            ids = torch.randint(3, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
            prefill(plain, ids[:, :256])
            prefill(model, ids[:, :256])  # warm-up (kernels compiled)
            try:
                t_plain, m_plain = prefill(plain, ids)
                t_ours, m_ours = prefill(model, ids)
            except torch.OutOfMemoryError:
                row("extend prefill", f"{name} N={n}", "out of memory", "")
                continue
            row("extend prefill", f"{name} N={n} (time; activations peak)", f"{t_ours:.2f} s; {m_ours:.2f} GiB",
                f"plain SDPA {t_plain:.2f} s; {m_plain:.2f} GiB",
                f"time {t_ours / t_plain:.2f}x, memory {m_ours / m_plain:.2f}x" if m_plain == m_plain else
                f"time {t_ours / t_plain:.2f}x")
        del model


# -------------------------------------------------------------------------------------------------- moe


def moe(device, budget: Budget, smoke: bool) -> None:
    import moe as moe_benchmark

    args = SimpleNamespace(tokens=256 if smoke else 8192, hidden=64 if smoke else 1024,
                           intermediate=128 if smoke else 2816, repeats=2 if smoke else 7)
    rows = moe_benchmark.run(device, args)
    dense = rows[0][1]
    for name, seconds in rows[1:]:
        row("moe fwd+bwd", f"{name}, {args.tokens} tokens, hidden {args.hidden}", f"{seconds * 1e3:.2f} ms",
            f"dense MLP {dense * 1e3:.2f} ms", f"{seconds / dense:.2f}x (2.0x the FLOPs)")


# ----------------------------------------------------------------------------------------------- tiling


def tiling(device, budget: Budget, smoke: bool) -> None:
    from transformers import LlamaForCausalLM

    from seq_tiling import measure, smollm2_config, variants

    tokens = 256 if smoke else 16384
    layer_counts = (2, 4) if smoke else (4, 8)
    wanted = ("+ tiled MLP", "+ offload", "transformers checkpointing + chunked loss (2,048)")
    found: dict[str, dict[int, dict]] = {}
    for layers in layer_counts:
        torch.manual_seed(0)
        config = smollm2_config(layers, tokens)
        if smoke:
            config.update(dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, vocab_size=256))
        assert config.use_cache  # as shipped
        model = LlamaForCausalLM(config).to(device).train()
        for name, spec, hf_checkpointing in variants(config):
            if name not in wanted:
                continue
            if budget.left() < 0:
                row("tiling memory", f"{name}, {layers} layers", "skipped: time budget", "")
                continue
            found.setdefault(name, {})[layers] = measure(model, spec, hf_checkpointing, tokens)
        del model
    low, high = layer_counts
    unit = tokens * config.hidden_size * 4 / 2**20
    for name, by_layers in found.items():
        if low in by_layers and high in by_layers:
            growth = (by_layers[high]["Activation"] - by_layers[low]["Activation"]) / (high - low) / unit
            row("tiling memory", f"{name}, {tokens} tokens, use_cache true, activations per layer",
                f"{growth:.2f} checkpointed inputs", "target <= 1.15",
                f"{by_layers[high]['Activation']:.0f} MiB at {high} layers, host {by_layers[high]['host']:.0f} MiB")


# ---------------------------------------------------------------------------------------------- longest


def longest(device, budget: Budget, smoke: bool) -> None:
    from longest_sequence import build, fits, longest as search
    from seq_tiling import smollm2_config, variants

    layers = 1 if smoke else 4
    start, limit, multiple = (64, 128, 64) if smoke else (8192, 262144, 8192)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {}
    for name, spec, _ in variants(smollm2_config(layers, 1))[:5]:
        if name not in ("plain", "+ offload"):
            continue
        if budget.left() < 0:
            row("longest fine-tune step", name, "skipped: time budget", "")
            continue
        model = build(layers, limit, device, dtype, spec)
        record: dict[int, dict] = {}
        best = search(lambda n: fits(model, n, device, record=record), start, limit, multiple)
        results[name] = (best, record.get(best, {}))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "+ offload" in results:
        best, rec = results["+ offload"]
        base = results.get("plain", (0, {}))[0]
        row("longest fine-tune step", f"SmolLM2 widths, {layers} layers, everything on vs plain (cap {limit})",
            f"{best} tokens ({rec.get('peak_gib', float('nan')):.1f} GiB, {rec.get('seconds', float('nan')):.1f} s)",
            f"plain {base} tokens", f"{best / base:.1f}x" if base else "")


SECTIONS = {"attention": (attention, 0.35), "extend": (extend, 0.2), "moe": (moe, 0.05), "tiling": (tiling, 0.2),
            "longest": (longest, 0.2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny inputs: checks the script, not the numbers")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole table")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_table.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "`--device cpu --smoke` runs every section on tiny inputs on the CPU")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = [f"{name}, torch {torch.__version__}{', smoke run (tiny inputs)' if args.smoke else ''}", "",
              "| section | case | hf_longctx | baseline | ratio / note |", "|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    start = time.monotonic()
    total = args.budget
    for section, (run, share) in SECTIONS.items():
        if args.only and section not in args.only:
            continue
        left = total - (time.monotonic() - start)
        try:
            run(device, Budget(min(left, max(share * total, 0.0)) if not args.smoke else left), args.smoke)
        except Exception as error:  # one failing section still leaves the others' rows
            traceback.print_exc(file=sys.stderr)
            row(section, "failed", f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}",
                "")
    if args.out:
        Path(args.out).write_text("\n".join(header + [f"| {' | '.join(r)} |" for r in ROWS]) + "\n")


if __name__ == "__main__":
    main()
