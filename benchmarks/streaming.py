"""Streaming benchmark: time per token and memory against tokens streamed, side by side in one run.

Methods, all on the same tiny model and token stream:
  dense      DynamicCache: every token kept (memory and time grow with the stream)
  window     SinkCache(0, W): a window without sinks
  sinks      SinkCache(S, W - S): StreamingLLM, the same cache size as the window
  recompute  sliding window with re-computation (the StreamingLLM baseline): each token re-reads
             its sinks and last tokens from scratch, without a cache

Usage: python benchmarks/streaming.py [--window 1024] [--multiples 2 20] [--repeats 3]
Prints a markdown table; memory is the peak KV-cache size and the process' peak resident set.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from transformers import DynamicCache

from hf_longctx import SinkCache
from hf_longctx.evaluation.streaming import streaming_perplexity
from hf_longctx.testing import tiny_model


def run(model, ids, method: str, sinks: int, window: int, checkpoints: list[int]):
    if method == "dense":
        return streaming_perplexity(model, ids, sinks, window, checkpoints=checkpoints, cache=DynamicCache(), progress=False)
    if method == "window":
        cache = SinkCache(0, window, model=model)
        return streaming_perplexity(model, ids, 0, window, checkpoints=checkpoints, cache=cache, progress=False)
    if method == "sinks":
        return streaming_perplexity(model, ids, sinks, window - sinks, checkpoints=checkpoints, progress=False)
    return streaming_perplexity(model, ids, sinks, window - sinks, checkpoints=checkpoints, recompute=True, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=1024, help="cache size S + W in tokens")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--multiples", type=int, nargs=2, default=[2, 20], help="stream lengths, in windows")
    parser.add_argument("--recompute-tokens", type=int, default=32, help="tokens timed for recompute (constant cost)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = tiny_model("llama", max_position_embeddings=args.window)
    short, long = (m * args.window for m in args.multiples)
    ids = torch.randint(3, model.config.vocab_size, (long + 1,), generator=torch.Generator().manual_seed(0))
    # each checkpoint times the tokens since the previous one: time the last 64 before each length
    checkpoints = [short - 64, short, long - 64, long]
    rows = {}
    for method in ("dense", "window", "sinks"):
        results = [run(model, ids, method, args.sinks, args.window, checkpoints) for _ in range(args.repeats)]
        rows[method] = [
            (
                statistics.median(r.points[i].ms_per_token for r in results),
                max(r.points[i].cache_bytes for r in results),
                max(r.points[i].peak_memory_bytes for r in results),
            )
            for i in (1, 3)
        ]
    stream = ids[: args.window + args.recompute_tokens + 1]
    recompute = [
        run(model, stream, "recompute", args.sinks, args.window, [args.window, args.window + args.recompute_tokens])
        for _ in range(args.repeats)
    ]
    ms = statistics.median(r.points[1].ms_per_token for r in recompute)
    rows["recompute"] = [(ms, 0, max(r.points[1].peak_memory_bytes for r in recompute))] * 2

    mib = 2**20
    print(f"streaming, tiny llama (hidden 64, 2 layers), window {args.window}, {platform.processor() or platform.machine()}")
    print(f"medians of {args.repeats} runs; ms/token over the 64 tokens before each length\n")
    print(
        f"| method | ms/token @ {short} | ms/token @ {long} | KV MiB @ {short} | KV MiB @ {long} | "
        f"KV {long}/{short} | peak RSS MiB @ {long} | sinks speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|")
    sinks_ms = rows["sinks"][1][0]
    for method, ((ms_s, kv_s, _), (ms_l, kv_l, rss_l)) in rows.items():
        ratio = f"{kv_l / kv_s:.3f}" if kv_s else "-"
        print(
            f"| {method} | {ms_s:.2f} | {ms_l:.2f} | {kv_s / mib:.3f} | {kv_l / mib:.3f} | {ratio} | "
            f"{rss_l / mib:.0f} | {ms_l / sinks_ms:.1f}x |"
        )


if __name__ == "__main__":
    main()
