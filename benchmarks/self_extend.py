"""Self-Extend prefill against the plain model with SDPA: time and peak memory, side by side in one run.

    python benchmarks/self_extend.py [--layers 4] [--repeats 3] [--lengths 4096,8192,16384] [--out FILE]

The model has SmolLM2-135M's widths (hidden 576, 9 query / 3 key-value heads of 64, MLP 1536,
vocabulary 49152, rope theta 100000, 8192 trained positions), random weights, float32, with
``--layers`` decoder layers (SmolLM2 has 30; the ratios are per layer and do not depend on the count).
A prefill is one forward of N tokens keeping the logits of the last one (as ``generate`` does).
``extend: {method: self_extend, group_size: 4, window: 1024}`` (the ``self-extend-4x`` preset)
against the unpatched model with transformers' SDPA attention. Time: the two are run
alternately, repeat after repeat, so that load on a shared machine hits both alike; medians.
Peak memory: every tensor the forward holds at once (parameters included), counted exactly by
``torch.distributed._tools.mem_tracker.MemTracker`` in a separate forward of each.
Targets at 16k: peak memory <= 1.5x and time <= 2.5x the plain model's.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_longctx
from hf_longctx.testing import cpu_name

SMOLLM2_WIDTHS = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
SPEC = "self-extend-4x"


def _load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _peak_bytes(model, ids) -> int:
    tracker = MemTracker()
    tracker.track_external(model, ids)
    with tracker, torch.inference_mode():
        model(ids, logits_to_keep=1, use_cache=False)
    return sum(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())


def run(layers: int, repeats: int, lengths: list[int]) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, **SMOLLM2_WIDTHS)
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32, attn_implementation="sdpa")
    extended = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32, attn_implementation="sdpa")
    extended.load_state_dict(plain.state_dict())
    hf_longctx.patch(extended.eval(), SPEC)
    plain.eval()
    models = {"plain": plain, "self_extend": extended}
    load_before = _load_average()
    lines = [f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, torch threads: "
             f"{torch.get_num_threads()}; SmolLM2-135M widths, {layers} layers, float32, B=1; preset {SPEC} "
             f"(G=4, W=1024) vs the plain model with SDPA; prefill (logits of the last token); time: median of "
             f"{repeats} alternating repeats; memory: MemTracker peak, parameters included.", "",
             "| N | plain (s) | self_extend (s) | time ratio | plain peak (MiB) | self_extend peak (MiB) | memory ratio |",
             "|---|---|---|---|---|---|---|"]
    for n in lengths:
        ids = torch.randint(3, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        times = {name: [] for name in models}
        with torch.inference_mode():
            for name, model in models.items():
                model(ids[:, :256], logits_to_keep=1, use_cache=False)  # warm-up
            for _ in range(repeats):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(ids, logits_to_keep=1, use_cache=False)
                    times[name].append(time.perf_counter() - start)
        peaks = {name: _peak_bytes(model, ids) / 2**20 for name, model in models.items()}
        t = {name: statistics.median(values) for name, values in times.items()}
        lines.append(f"| {n} | {t['plain']:.2f} | {t['self_extend']:.2f} | {t['self_extend'] / t['plain']:.2f} | "
                     f"{peaks['plain']:.0f} | {peaks['self_extend']:.0f} | {peaks['self_extend'] / peaks['plain']:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", f"Load average (1/5/15 min) at the start: {load_before}; at the end: {_load_average()}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    table = run(args.layers, args.repeats, [int(x) for x in args.lengths.split(",")])
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
