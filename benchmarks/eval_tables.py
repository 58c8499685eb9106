"""Markdown tables of the finished cells of `hf-longctx eval` runs (their --out/cells.json), whatever has finished.

    python benchmarks/eval_tables.py benchmarks/smollm2-eval

reads FOLDER/needle/cells.json, FOLDER/perplexity/cells.json and FOLDER/ruler/cells.json (those present)
and prints: the needle score per method and length (mean over depths, with the per-depth scores), the
effective length at 85.6, the perplexity at the given lengths, and the lm-eval scores per task.
A cell not yet measured is shown as "-".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hf_longctx.evaluation.needle import DEFAULT_THRESHOLD, effective_length, mean_scores
from hf_longctx.evaluation.report import format_length

METHODS = ("none", "yarn-4x", "dynamic-ntk-4x", "self-extend-4x", "dual-chunk-8k")


def _cells(path: Path) -> list:
    return list(json.loads(path.read_text()).values()) if path.is_file() else []


def _order(names):
    return sorted(set(names), key=lambda n: (METHODS.index(n) if n in METHODS else len(METHODS), n))


def needle_tables(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    methods = _order(r["method"] for r in rows)
    depths = sorted({r["depth"] for r in rows})
    lines = ["| method | " + " | ".join(format_length(n) for n in lengths) + " | effective length |",
             "|---|" + "---|" * (len(lengths) + 1)]  # fmt: skip
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        means = mean_scores(mine)
        cells = []
        for n in lengths:
            here = {r["depth"]: r["score"] for r in mine if r["length"] == n}
            if n not in means:
                cells.append("-")
                continue
            per_depth = "/".join(f"{here[d]:.0f}" if d in here else "-" for d in depths)
            cells.append(f"{means[n]:.0f} ({per_depth})")
        # the effective length counts only when every shorter length of the grid was measured
        measured = [n for n in lengths if n in means]
        complete = measured == lengths[: len(measured)]
        effective = effective_length(mine, DEFAULT_THRESHOLD) if complete else None
        shown = "-" if effective is None else format_length(effective)
        if effective is not None and effective == max(measured):
            shown = f">= {shown} (longest measured)"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {shown} |")
    depth_text = "/".join(f"{d:.0%}" for d in depths)
    return f"Needle score, % found: mean over depths ({depth_text} in parentheses)\n\n" + "\n".join(lines)


def perplexity_table(groups: list[list[dict]]) -> str:
    rows = [r for g in groups for r in g]
    lengths = sorted({r["length"] for r in rows})
    lines = ["| method | " + " | ".join(f"ppl {format_length(n)}" for n in lengths) + " | bits/byte | vs none |",
             "|---|" + "---|" * (len(lengths) + 2)]  # fmt: skip
    base = {r["length"]: r["perplexity"] for r in rows if r["method"] == "none"}
    for m in _order(r["method"] for r in rows):
        mine = {r["length"]: r for r in rows if r["method"] == m}
        ppl = [f"{mine[n]['perplexity']:.3f}" if n in mine else "-" for n in lengths]
        last = mine.get(lengths[-1])
        bpb = f"{last['bits_per_byte']:.4f}" if last and last.get("bits_per_byte") else "-"
        ratio = f"{last['perplexity'] / base[lengths[-1]]:.4f}x" if last and lengths[-1] in base else "-"
        lines.append(f"| {m} | " + " | ".join(ppl) + f" | {bpb} | {ratio} |")
    return "Perplexity of the same final tokens (ratio to the unpatched model at the longest length)\n\n" + "\n".join(lines)


def harness_table(rows: list[dict]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    header = [f"{t} {format_length(n)}" for n in lengths for t in tasks]
    lines = ["| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for m in _order(r["method"] for r in rows):
        got = {(r["task"], r["length"]): r for r in rows if r["method"] == m}
        cells = []
        for n in lengths:
            for t in tasks:
                r = got.get((t, n))
                cells.append("-" if r is None else ("n/a" if r["score"] is None else f"{r['score']:.2f}"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    limits = sorted({str(r["limit"]) for r in rows})
    return f"lm-eval scores (0-1), --limit {', '.join(limits)} sample(s) per task and length\n\n" + "\n".join(lines)


def main(folder: str) -> None:
    root = Path(folder)
    needle = _cells(root / "needle" / "cells.json")
    if needle:
        print(needle_tables(needle) + "\n")
    perplexity = _cells(root / "perplexity" / "cells.json")
    if perplexity:
        print(perplexity_table(perplexity) + "\n")
    harness = _cells(root / "ruler" / "cells.json")
    if harness:
        print(harness_table(harness) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/smollm2-eval")
