"""Streaming benchmark: memory and time per token against tokens streamed, and SinkCache vs
re-computation at a window of 1024, each measured side by side in one run.

Table 1 (memory, tiny llama: hidden 64, 2 layers), one token at a time through
``streaming_perplexity`` up to 2x and 20x ``--memory-window``:
  dense      DynamicCache: every token kept (memory and time grow with the stream)
  window     SinkCache(0, W): a window without sinks
  sinks      SinkCache(S, W - S): StreamingLLM, the same cache size as the window

Table 2 (speed at ``--window``, S + W = window), for the tiny model and a small realistic llama
(hidden 512, 8 layers, 8 heads of 64, 8 KV heads, MLP 1376, vocab 32000); the methods alternate
within each repeat so that both see the same machine load:
  sinks      SinkCache(S, W - S) filled to S + W in one pass, then one token per step, each step
             evicting one token (the steady state of a long stream)
  recompute  sliding window with re-computation (the StreamingLLM baseline): each token re-reads
             its sinks and last tokens from scratch, no cache; only the last position's logits

Usage: python benchmarks/streaming.py [--window 1024] [--memory-window 128] [--repeats 3]
Prints markdown tables of medians over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from hf_longctx import SinkCache
from hf_longctx.evaluation.streaming import kept_indices, streaming_perplexity
from hf_longctx.streaming import streaming_forward
from hf_longctx.testing import cpu_name, tiny_model

CONFIGS = {
    "tiny": {},
    "small": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
        intermediate_size=1376, vocab_size=32000,
    ),
}


def memory_rows(window: int, sinks: int, multiples: list[int], repeats: int) -> dict[str, list[tuple]]:
    """method -> [(ms/token, KV bytes, peak RSS bytes) at each stream length], medians over repeats."""
    model = tiny_model("llama", max_position_embeddings=window)
    short, long = (m * window for m in multiples)
    ids = torch.randint(3, model.config.vocab_size, (long + 1,), generator=torch.Generator().manual_seed(0))
    checkpoints = [short - 64, short, long - 64, long]  # time the last 64 tokens before each length
    caches = {"dense": lambda: DynamicCache(), "window": lambda: SinkCache(0, window, model=model), "sinks": lambda: None}
    results = {method: [] for method in caches}
    for _ in tqdm(range(repeats), desc="memory table"):
        for method, make_cache in caches.items():
            s, w = (0, window) if method == "window" else (sinks, window - sinks)
            results[method].append(
                streaming_perplexity(model, ids, s, w, checkpoints=checkpoints, cache=make_cache(), progress=False)
            )
    return {
        method: [
            (
                statistics.median(r.points[i].ms_per_token for r in runs),
                max(r.points[i].cache_bytes for r in runs),
                max(r.points[i].peak_memory_bytes for r in runs),
            )
            for i in (1, 3)
        ]
        for method, runs in results.items()
    }


@torch.no_grad()
def sinks_ms(model, ids: torch.Tensor, sinks: int, window: int, tokens: int) -> float:
    cache = SinkCache(sinks, window - sinks, model=model)
    forward = type(model).forward.__get__(model)
    streaming_forward(model, forward, cache, input_ids=ids[:, :window])  # fills the cache, no eviction
    start = time.perf_counter()
    for t in range(window, window + tokens):
        streaming_forward(model, forward, cache, input_ids=ids[:, t : t + 1], logits_to_keep=1)
    return 1000 * (time.perf_counter() - start) / tokens


@torch.no_grad()
def recompute_ms(model, ids: torch.Tensor, sinks: int, window: int, tokens: int) -> float:
    start = time.perf_counter()
    for t in range(window, window + tokens):
        model(ids[:, kept_indices(t, sinks, window - sinks)], logits_to_keep=1)
    return 1000 * (time.perf_counter() - start) / tokens


def speed_rows(window: int, sinks: int, tokens: dict[str, int], repeats: int) -> dict[str, tuple[float, float]]:
    """config -> (sinks ms/token, recompute ms/token), medians over repeats that alternate the methods."""
    rows = {}
    for name, overrides in CONFIGS.items():
        model = tiny_model("llama", max_position_embeddings=window, **overrides)
        n = window + max(tokens.values())
        ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
        times = {"sinks": [], "recompute": []}
        for _ in tqdm(range(repeats), desc=f"speed table, {name}"):
            times["sinks"].append(sinks_ms(model, ids, sinks, window, tokens["sinks"]))
            times["recompute"].append(recompute_ms(model, ids, sinks, window, tokens["recompute"]))
        rows[name] = (statistics.median(times["sinks"]), statistics.median(times["recompute"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=1024, help="cache size S + W of the speed table")
    parser.add_argument("--memory-window", type=int, default=128, help="cache size S + W of the memory table")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--multiples", type=int, nargs=2, default=[2, 20], help="memory table lengths, in windows")
    parser.add_argument("--sink-tokens-timed", type=int, default=64, help="decode steps timed per repeat (sinks)")
    parser.add_argument("--recompute-tokens", type=int, default=8, help="tokens timed per repeat (recompute)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    machine = cpu_name()
    mib = 2**20

    memory = memory_rows(args.memory_window, args.sinks, args.multiples, args.repeats)
    short, long = (m * args.memory_window for m in args.multiples)
    print(f"memory, tiny llama (hidden 64, 2 layers), window {args.memory_window}, {machine}, "
          f"medians of {args.repeats}; ms/token over the 64 tokens before each length\n")
    print(f"| method | ms/token @ {short} | ms/token @ {long} | KV MiB @ {short} | KV MiB @ {long} | "
          f"KV {long}/{short} | peak RSS MiB @ {long} |")
    print("|---|---|---|---|---|---|---|")
    for method, ((ms_s, kv_s, _), (ms_l, kv_l, rss_l)) in memory.items():
        print(f"| {method} | {ms_s:.2f} | {ms_l:.2f} | {kv_s / mib:.3f} | {kv_l / mib:.3f} | {kv_l / kv_s:.3f} | "
              f"{rss_l / mib:.0f} |")

    speed = speed_rows(args.window, args.sinks, {"sinks": args.sink_tokens_timed, "recompute": args.recompute_tokens},
                       args.repeats)
    print(f"\nspeed at window {args.window} (S={args.sinks}), {machine}, medians of {args.repeats} alternating "
          f"repeats ({args.sink_tokens_timed} SinkCache steps, {args.recompute_tokens} re-computed tokens each)\n")
    print("| model | SinkCache ms/token | recompute ms/token | recompute / SinkCache |")
    print("|---|---|---|---|")
    for name, (sink, recompute) in speed.items():
        print(f"| {name} | {sink:.2f} | {recompute:.1f} | {recompute / sink:.1f}x |")


if __name__ == "__main__":
    main()
