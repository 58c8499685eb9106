"""Recurrent memory (RMT) benchmark: learning a task that needs memory, and cost per token vs input length.

    python benchmarks/memory.py                       # all three parts, markdown tables on stdout
    python benchmarks/memory.py --part learn --steps 300
    python benchmarks/memory.py --part cost --lengths 4096 8192 16384 32768 65536
    python benchmarks/memory.py --part generate --new-tokens 256 --prompt-length 384
    python benchmarks/memory.py --output memory_tables.md

Learning: a tiny random llama (hidden 64, 2 layers) is trained on the passkey task of
``hf_longctx.memory.task`` (the passkey in the first of 5 segments of 8 tokens, the question in the
last) with 4 memory tokens and full BPTT, and again with no memory tokens (segments processed
independently); both start from the same weights and see the same batches (fixed seeds), and are
scored on held-out examples.

Cost: the forward pass of a wrapped tiny model (the ``rmt-16x512`` preset: 16 memory tokens per
512-token segment) on inputs of 4k to 64k tokens, median time per token over repeats, as a ratio
to the shortest input, all measured in this one run.

Generation: greedy ``generate`` of the same wrapped model, ``max_new_tokens`` new tokens after a
prompt that ends in the first segment (so that decoding crosses a segment boundary), with the
RecurrentMemoryCache against ``use_cache=False`` (the wrapper's forward over the whole sequence at every
step, last logits only), alternating, median over repeats; the two must give the same tokens.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import hf_longctx
from hf_longctx.memory.task import PasskeyTask, evaluate_memory_task, train_memory_task
from hf_longctx.testing import cpu_name, tiny_model

def machine() -> str:
    """CPU model name, core count and torch threads."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def learning_table(steps: int, memory_tokens: int, seed: int) -> str:
    task = PasskeyTask()
    rows = []
    for m in (memory_tokens, 0):
        spec = {"memory": {"memory_tokens": m, "segment_length": task.segment_length, "bptt_depth": None}}
        model = hf_longctx.patch(tiny_model("llama", seed=seed), spec)
        start = time.perf_counter()
        losses = train_memory_task(model, task, steps=steps, seed=seed, desc=f"memory_tokens={m}")
        seconds = time.perf_counter() - start
        accuracy = evaluate_memory_task(model, task, seed=seed + 1)
        rows.append(f"| {m} | {accuracy:.1%} | {1 / task.num_values:.1%} | {statistics.mean(losses[-20:]):.3f} | {seconds:.0f} |")
    distance = task.num_segments - 1
    return "\n".join(
        [
            f"Passkey {distance} segments before its question ({task.num_segments} segments of "
            f"{task.segment_length} tokens, {task.num_values} values), tiny llama trained {steps} steps "
            f"(batch 32, seed {seed}), 512 held-out examples:",
            "",
            "| memory tokens | held-out accuracy | chance | final train loss | train seconds |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )


def cost_table(lengths: list[int], repeats: int, preset: str) -> str:
    spec = hf_longctx.load_spec(preset)
    span = spec.memory.segment_length + 2 * spec.memory.memory_tokens
    model = hf_longctx.patch(tiny_model("llama", max_position_embeddings=span), spec)
    inputs = {n: torch.randint(3, 128, (1, n)) for n in lengths}
    times: dict[int, list[float]] = {n: [] for n in lengths}
    with torch.no_grad():
        model(input_ids=inputs[lengths[0]])  # warm-up
        # Round robin over the lengths, so that a change in the machine's load hits every length alike.
        for _ in tqdm(range(repeats), desc="cost per token"):
            for n, ids in inputs.items():
                start = time.perf_counter()
                model(input_ids=ids)
                times[n].append((time.perf_counter() - start) / n)
    per_token = {n: statistics.median(t) for n, t in times.items()}
    first = per_token[lengths[0]]
    rows = [f"| {n} | {n // spec.memory.segment_length} | {t * 1e6:.2f} | {t / first:.2f} |" for n, t in per_token.items()]
    spread = max(per_token.values()) / min(per_token.values())
    return "\n".join(
        [
            f"Forward pass of a tiny llama patched with `{preset}`, batch 1, median of {repeats} round-robin repeats:",
            "",
            "| input tokens | segments | µs per token | ratio to shortest |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Largest / smallest cost per token: {spread:.2f}x (target: within 1.3x).",
        ]
    )


def generate_table(new_tokens: int, prompt_length: int, repeats: int, preset: str) -> str:
    spec = hf_longctx.load_spec(preset)
    span = spec.memory.segment_length + 2 * spec.memory.memory_tokens
    model = hf_longctx.patch(tiny_model("llama", max_position_embeddings=span), spec)
    prompt = torch.randint(3, 128, (1, prompt_length))
    options = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    for use_cache in (True, False):  # warm-up
        model.generate(prompt, use_cache=use_cache, **{**options, "max_new_tokens": 8})
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens = {}
    for _ in tqdm(range(repeats), desc="generate"):
        for use_cache in times:
            start = time.perf_counter()
            tokens[use_cache] = model.generate(prompt, use_cache=use_cache, **options)
            times[use_cache].append(time.perf_counter() - start)
    if not torch.equal(tokens[True], tokens[False]):
        raise AssertionError("cached and recomputed generation gave different tokens")
    cached, recomputed = statistics.median(times[True]), statistics.median(times[False])
    boundaries = (prompt_length + new_tokens - 1) // spec.memory.segment_length
    return "\n".join(
        [
            f"Greedy generate of {new_tokens} new tokens after a {prompt_length}-token prompt (batch 1, tiny llama patched "
            f"with `{preset}`, crossing {boundaries} segment boundar{'y' if boundaries == 1 else 'ies'}), median of {repeats} "
            "alternating repeats; "
            "both give the same tokens:",
            "",
            "| generation | seconds | ms per new token |",
            "|---|---|---|",
            f"| RecurrentMemoryCache | {cached:.2f} | {cached / new_tokens * 1e3:.1f} |",
            f"| use_cache=False (forward on the whole sequence per step) | {recomputed:.2f} | {recomputed / new_tokens * 1e3:.1f} |",
            "",
            f"Cached generation is {recomputed / cached:.2f}x faster than recomputing.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["learn", "cost", "generate", "all"], default="all")
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--memory-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per generate call")
    parser.add_argument("--prompt-length", type=int, default=384)
    parser.add_argument("--preset", default="rmt-16x512")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=None, help="also write the tables to this markdown file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [f"# Recurrent memory (RMT) benchmark\n\nMachine: {machine()}."]
    if args.part in ("learn", "all"):
        sections.append("## Learning a task that needs memory\n\n" + learning_table(args.steps, args.memory_tokens, args.seed))
    if args.part in ("cost", "all"):
        sections.append("## Cost per token from 4k to 64k tokens\n\n" + cost_table(args.lengths, args.repeats, args.preset))
    if args.part in ("generate", "all"):
        sections.append(
            "## Cached generation vs recomputing\n\n" + generate_table(args.new_tokens, args.prompt_length, args.repeats, args.preset)
        )
    report = "\n\n".join(sections) + "\n"
    print(report)
    if args.output is not None:
        args.output.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
