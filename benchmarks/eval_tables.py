"""Markdown tables of the finished cells of `hf-longctx eval` runs (their --out/cells.json), whatever has finished.

    python benchmarks/eval_tables.py benchmarks/smollm2-eval [--plots --trained 8192]

reads FOLDER/needle/cells.json, FOLDER/perplexity/cells.json, FOLDER/ruler/cells.json and
FOLDER/passkey/results.json (those present) and prints: the needle score per method and length (mean over
the depths measured, with the per-depth scores), the effective length at 85.6, the perplexity at the given
lengths, the lm-eval scores per task and the passkey trials. A cell not yet measured is shown as "-".
With --plots it also draws FOLDER/needle/needle-METHOD.png from every finished cell (blank: not measured),
the dotted line after the --trained length, and needle-all.png with every method side by side.
With --compact the lm-eval table has one row per task and one column per length (the README's form).
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
        # the effective length counts a length only with every depth of the grid measured there, and only
        # when every shorter length of the grid is complete too
        measured = [n for n in lengths if {r["depth"] for r in mine if r["length"] == n} == set(depths)]
        complete = measured == lengths[: len(measured)] and measured
        effective = effective_length([r for r in mine if r["length"] in measured], DEFAULT_THRESHOLD) if complete else None
        shown = "-" if effective is None else format_length(effective)
        if effective is not None and effective == max(measured):
            shown = f">= {shown} (longest with every depth)"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {shown} |")
    depth_text = "/".join(f"{d:.0%}" for d in depths)
    return (f"Needle score, % found: mean over the depths measured ({depth_text} in parentheses, - = not measured; "
            "the effective length counts only lengths with every depth measured)\n\n" + "\n".join(lines))


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


def _score(row: dict | None, short: bool = False) -> str:
    """A score to two decimals ("-" not measured, "n/a" no score); `short` drops trailing zeros (0.20 -> 0.2)."""
    if row is None:
        return "-"
    if row["score"] is None:
        return "n/a"
    text = f"{row['score']:.2f}"
    return text.rstrip("0").rstrip(".") if short else text


def harness_table(rows: list[dict], compact: bool = False) -> str:
    """One row per (task, length) with any score, one column per method.

    With `compact`, one row per task and one column per length instead, every method's score in a cell
    ("a · b · c" in the method order the caption names; "-" where not measured), for a README."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    methods = _order(r["method"] for r in rows)
    got = {(r["method"], r["task"], r["length"]): r for r in rows}
    limits = sorted({str(r["limit"]) for r in rows})
    caption = f"lm-eval scores (0-1), --limit {', '.join(limits)} sample(s) per task and length"
    if compact:
        lines = ["| task | " + " | ".join(format_length(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for t in tasks:
            cells = []
            for n in lengths:
                here = [got.get((m, t, n)) for m in methods]
                cells.append("-" if all(r is None for r in here) else " · ".join(_score(r, short=True) for r in here))
            lines.append(f"| `{t}` | " + " | ".join(cells) + " |")
        return f"{caption}; each cell: {' · '.join(methods)}\n\n" + "\n".join(lines)
    lines = ["| task | length | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for t in tasks:
        for n in lengths:
            here = [got.get((m, t, n)) for m in methods]
            if all(r is None for r in here):
                continue
            lines.append(f"| {t} | {format_length(n)} | " + " | ".join(_score(r) for r in here) + " |")
    return f"{caption}\n\n" + "\n".join(lines)


def passkey_table(rows: list[dict]) -> str:
    lines = ["| method | length | depth | retrieved | first number of the continuation |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (_order([x["method"] for x in rows]).index(r["method"]), r["length"], r["depth"])):
        answers = ", ".join(f"`{a}`" if a else "(none)" for a in r.get("answers") or [])
        lines.append(f"| {r['method']} | {format_length(r['length'])} | {r['depth']:.0%} | "
                     f"{round(r['accuracy'] * r['trials'])}/{r['trials']} | {answers} |")  # fmt: skip
    return "Passkey (5-digit key in repeated filler, greedy continuation)\n\n" + "\n".join(lines)


def needle_plots(rows: list[dict], folder: Path, trained: int | None) -> list[Path]:
    from hf_longctx.evaluation.report import plot_needle

    written = []
    lengths, depths = sorted({r["length"] for r in rows}), sorted({r["depth"] for r in rows})
    for m in _order(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        grid = {(r["length"], r["depth"]) for r in mine}
        complete = [r for r in mine if all((r["length"], d) in grid for d in depths)]
        full = [n for n in lengths if all((n, d) in grid for d in depths)]
        effective = effective_length(complete, DEFAULT_THRESHOLD) if full == lengths[: len(full)] and full else None
        title = (f"{m}: effective length ({DEFAULT_THRESHOLD:g}%, lengths with every depth): "
                 f"{'-' if effective is None else format_length(effective)}")  # fmt: skip
        written.append(plot_needle(mine, folder / f"needle-{m}.png", trained_length=trained, title=title))
    return written


def needle_panel(rows: list[dict], path: Path, trained: int | None, title: str) -> Path:
    """Every method's heatmap side by side on one figure (same lengths and depths), for a README."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    methods = _order(r["method"] for r in rows)
    lengths, depths = sorted({r["length"] for r in rows}), sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(1.0 * len(lengths) * len(methods) + 1.5, 0.45 * len(depths) + 1.6),
                             sharey=True, squeeze=False)  # fmt: skip
    for ax, m in zip(axes[0], methods):
        cells = {(r["depth"], r["length"]): r["score"] for r in rows if r["method"] == m}
        grid = [[cells.get((d, n), float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0.0, vmax=100.0, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value == value:  # not NaN
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        if trained is not None:
            inside = [j for j, n in enumerate(lengths) if n <= trained]
            if inside and inside[-1] < len(lengths) - 1:
                ax.axvline(inside[-1] + 0.5, color="black", linestyle=":", linewidth=1.5)
        ax.set_title(m, fontsize=9)
    axes[0][0].set_ylabel("needle depth")
    fig.suptitle(title, fontsize=10, y=1.06)
    fig.colorbar(image, ax=axes[0].tolist(), label="% found", fraction=0.02)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", default="benchmarks/smollm2-eval")
    parser.add_argument("--plots", action="store_true", help="draw the needle heatmaps from the cells")
    parser.add_argument("--trained", type=int, help="the model's trained length (dotted line on the heatmaps)")
    parser.add_argument("--title", default="needle in a haystack", help="title of the side-by-side figure")
    parser.add_argument("--compact", action="store_true",
                        help="lm-eval scores as one row per task, one column per length, every method in a cell")
    args = parser.parse_args(argv)
    root = Path(args.folder)
    needle = _cells(root / "needle" / "cells.json")
    if needle:
        print(needle_tables(needle) + "\n")
        if args.plots:
            written = needle_plots(needle, root / "needle", args.trained)
            written.append(needle_panel(needle, root / "needle" / "needle-all.png", args.trained, args.title))
            print("Wrote " + ", ".join(map(str, written)) + "\n")
    perplexity = _cells(root / "perplexity" / "cells.json")
    if perplexity:
        print(perplexity_table(perplexity) + "\n")
    harness = _cells(root / "ruler" / "cells.json")
    if harness:
        print(harness_table(harness, compact=args.compact) + "\n")
    passkey = root / "passkey" / "results.json"
    if passkey.is_file():
        print(passkey_table(json.loads(passkey.read_text()).get("passkey", [])) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
