"""Attention speed: hf_longctx.kernels.flash_attention against PyTorch, measured side by side.

    python benchmarks/attention.py --device cpu [--out FILE]
    python benchmarks/attention.py --device cuda [--out FILE]

cpu: the blocked sliding-window path against scaled_dot_product_attention with a dense
boolean mask; fp32, B=1, H=8, D=64, W=512, N = 4k, 8k, 16k; forward only. The two are
timed alternately, repeat after repeat, so that load on a shared machine hits both alike;
the table gives medians, and the load average at the start and end of the run says how
shared the machine was. Target: blocked >= 4x faster at N = 8k and 16k, with torch's
default threads.

cuda: the Triton kernel, bf16, D = 64 and 128, N = 1k..16k with B·N = 16k and H·D = 2048;
causal, non-causal, GQA 32/8 (Hq/Hkv = 4), windows 1k and 4k, sinks, ALiBi; forward,
backward and forward+backward, against every SDPA backend that accepts the mask (math
only up to N = 4k) and compiled flex_attention with the same mask; plus W = 4k at N = 32k
against flex. Medians of triton.testing.do_bench. TFLOP/s count only visible (query, key)
pairs: forward 4·pairs·D, backward 2.5x that, forward+backward 3.5x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from hf_longctx.kernels import flash_attention
from hf_longctx.kernels.reference import visible
from hf_longctx.testing import cpu_name


def _load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run_cpu(repeats: int) -> str:
    heads, d, window = 8, 64, 512
    load_before = _load_average()
    lines = [f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, torch threads: {torch.get_num_threads()}; fp32, B=1, "
             f"H={heads}, D={d}, causal, W={window}, forward; median of {repeats} alternating repeats.", "",
             "| N | SDPA dense mask (ms) | blocked (ms) | speed-up | max abs diff |", "|---|---|---|---|---|"]
    for n in (4096, 8192, 16384):
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, heads, n, d, generator=gen) for _ in range(3))
        pos = torch.arange(n)
        mask = visible(pos, pos, causal=True, window=window, sink_tokens=0)
        runs = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "blocked": lambda: flash_attention(q, k, v, window=window, backend="blocked"),
        }
        times = {name: [] for name in runs}
        with torch.inference_mode():
            outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the outputs to compare
            for _ in range(repeats):
                for name, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(1e3 * (time.perf_counter() - start))
        sdpa_ms, ours_ms = (statistics.median(times[name]) for name in ("sdpa", "blocked"))
        diff = (outputs["sdpa"] - outputs["blocked"]).abs().max().item()
        lines.append(f"| {n} | {sdpa_ms:.1f} | {ours_ms:.1f} | {sdpa_ms / ours_ms:.1f}x | {diff:.1e} |")
        print(lines[-1], flush=True)
    lines += ["", f"Load average (1/5/15 min) at start: {load_before}, at end: {_load_average()}."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- cuda

SCENARIOS = {  # name: (kv head divisor, flash_attention options)
    "causal": (1, dict(causal=True)),
    "non-causal": (1, dict(causal=False)),
    "GQA 32/8 causal": (4, dict(causal=True)),
    "window 1k": (1, dict(window=1024)),
    "window 4k": (1, dict(window=4096)),
    "window 1k + 4 sinks": (1, dict(window=1024, sink_tokens=4)),
    "ALiBi causal": (1, dict(alibi=True)),
}


def _visible_pairs(n: int, causal=True, window=None, sink_tokens=0, **_) -> int:
    """Visible (query, key) pairs of one head of one sequence of n tokens."""
    if not causal:
        return n * n
    i = torch.arange(n, dtype=torch.int64)
    if window is None:
        return int((i + 1).sum())
    return int((torch.clamp(i + 1, max=window) + torch.clamp(i - window + 1, min=0).clamp(max=sink_tokens)).sum())


def _mask_mod(causal=True, window=None, sink_tokens=0, **_):
    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx
        if window is not None:
            ok = ok & ((kv_idx > q_idx - window) | (kv_idx < sink_tokens))
        return ok
    return mask_mod if causal else None


def _implementations(q, k, v, options, slopes, n, with_math):
    """name -> forward callable, for ours, each SDPA backend and compiled flex_attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    causal, gqa = options.get("causal", True), q.shape[1] != k.shape[1]
    ours = dict(options, alibi_slopes=slopes)
    impls = {"hf_longctx triton": lambda: flash_attention(q, k, v, backend="triton", **ours)}

    plain_causal = causal and slopes is None and "window" not in options
    attn_mask = None
    if not plain_causal and (causal or slopes is not None):
        pos = torch.arange(n, device=q.device)
        keep = visible(pos, pos, causal=causal, window=options.get("window"),
                       sink_tokens=options.get("sink_tokens", 0))
        attn_mask = keep
        if slopes is not None:
            attn_mask = (-slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()).masked_fill(~keep, -torch.inf)
            attn_mask = attn_mask.to(q.dtype)
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    for backend in backends + ([SDPBackend.MATH] if with_math else []):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=plain_causal,
                                                      enable_gqa=gqa)
        impls[f"SDPA {backend.name.lower()}"] = sdpa

    mask_mod = _mask_mod(**options)
    block_mask = create_block_mask(mask_mod, None, None, n, n, device=q.device) if mask_mod else None
    score_mod = None
    if slopes is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx).abs()
    flex = torch.compile(flex_attention, dynamic=False)
    impls["flex_attention (compiled)"] = lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                      enable_gqa=gqa)
    return impls


def _bench_cuda_config(d, n, batch, heads, name, divisor, options, rows, only=None):
    from triton.testing import do_bench

    options = dict(options)
    slopes = None
    if options.pop("alibi", False):
        slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)], device="cuda")
    q = torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, heads // divisor, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    do = torch.randn_like(q)
    flops_fwd = 4 * _visible_pairs(n, **options) * d * batch * heads
    results = {}
    for impl, fwd in _implementations(q, k, v, options, slopes, n, with_math=n <= 4096).items():
        if only and impl not in only:
            continue
        try:
            out = fwd()
            timings = {
                "fwd": do_bench(fwd, return_mode="median"),
                "bwd": do_bench(lambda: out.backward(do, retain_graph=True), grad_to_none=[q, k, v],
                                return_mode="median"),
                "fwd+bwd": do_bench(lambda: fwd().backward(do), grad_to_none=[q, k, v], return_mode="median"),
            }
        except (RuntimeError, torch.OutOfMemoryError) as error:  # backend rejects this mask / dtype / size
            timings = {"error": str(error).splitlines()[0][:60]}
        finally:
            torch.cuda.empty_cache()
        results[impl] = timings
    ours = results["hf_longctx triton"]
    first_row = len(rows)
    for impl, timings in results.items():
        for mode, factor in (("fwd", 1.0), ("bwd", 2.5), ("fwd+bwd", 3.5)):
            if "error" in timings:
                rows.append(f"| {d} | {n} | {batch} | {heads}/{heads // divisor} | {name} | {mode} | {impl} | "
                            f"n/a ({timings['error']}) | | |")
                break
            ms = timings[mode]
            rows.append(f"| {d} | {n} | {batch} | {heads}/{heads // divisor} | {name} | {mode} | {impl} | {ms:.3f} | "
                        f"{factor * flops_fwd / ms / 1e9:.1f} | {ms / ours[mode]:.2f} |")
    print("\n".join(rows[first_row:]), flush=True)


def run_cuda() -> str:
    rows = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16; medians of "
            "triton.testing.do_bench; TFLOP/s over visible pairs only; last column: time / ours time.", "",
            "| D | N | B | Hq/Hkv | mask | pass | impl | ms | TFLOP/s | x ours |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for d in (64, 128):
        heads = 2048 // d
        for n in (1024, 2048, 4096, 8192, 16384):
            for name, (divisor, options) in SCENARIOS.items():
                if options.get("window", 0) >= n:
                    continue  # the window covers the whole sequence: same as causal
                _bench_cuda_config(d, n, 16384 // n, heads, name, divisor, options, rows)
    for d in (64, 128):
        _bench_cuda_config(d, 32768, 1, 2048 // d, "window 4k", 1, dict(window=4096), rows,
                           only=("hf_longctx triton", "flex_attention (compiled)"))
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="cpu: timed repeats per implementation")
    parser.add_argument("--threads", type=int, help="cpu: torch threads (default: torch's own default)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = run_cpu(args.repeats) if args.device == "cpu" else run_cuda()
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
