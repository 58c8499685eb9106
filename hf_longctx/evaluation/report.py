"""Tables (markdown) and plots (matplotlib, Agg backend: no display needed) of evaluation rows.

Rows are plain dicts, as written to JSON: ``{"method": ..., "length": ..., "bits_per_byte": ...}``
and the like. A table puts one row per ``row_key`` value and one column per ``column_key`` value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def format_length(tokens: int) -> str:
    """1024 -> '1k', 1536 -> '1.5k', 100 -> '100'."""
    if tokens >= 1024 and tokens % 512 == 0:
        return f"{tokens / 1024:g}k"
    return str(tokens)


def markdown_table(
    rows: Sequence[dict[str, Any]],
    value_key: str,
    row_key: str = "method",
    column_key: str = "length",
    fmt: str = "{:.3f}",
) -> str:
    """A pivot of ``rows``: ``row_key`` values down, ``column_key`` values across, ``value_key`` in the cells.

    Rows and columns keep the order in which they first appear; a missing cell is blank.
    Integer column values are shown as token counts (``format_length``).
    """
    row_names = _unique(r[row_key] for r in rows)
    columns = _unique(r[column_key] for r in rows)
    cells = {(r[row_key], r[column_key]): r[value_key] for r in rows}
    header = [row_key] + [format_length(c) if isinstance(c, int) else str(c) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in row_names:
        values = [cells.get((name, c)) for c in columns]
        rendered = ["" if v is None else fmt.format(v) for v in values]
        lines.append("| " + " | ".join([str(name), *rendered]) + " |")
    return "\n".join(lines)


def plot_lines(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    value_key: str,
    *,
    group_key: str = "method",
    x_key: str = "length",
    title: str = "",
    ylabel: str | None = None,
    xlabel: str = "context length (tokens)",
    reference_x: float | None = None,
) -> Path:
    """One line per ``group_key`` value of ``value_key`` against ``x_key`` (log2 axis); writes a PNG.

    ``reference_x`` draws a dotted vertical line there (the trained context length).
    """
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in _unique(r[group_key] for r in rows):
        points = [(r[x_key], r[value_key]) for r in rows if r[group_key] == name and r[value_key] is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=str(name))
    xs = sorted(_unique(r[x_key] for r in rows))
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [format_length(x) for x in xs])
    if reference_x is not None:
        ax.axvline(reference_x, color="grey", linestyle=":", label="trained length")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or value_key.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _depth_length_grid(rows: Sequence[dict[str, Any]], value: str) -> tuple[list, list, list[list[float]]]:
    """(lengths, depths, grid[depth][length] of ``value``; NaN where no row) of a heatmap's rows."""
    lengths = sorted(_unique(r["length"] for r in rows))
    depths = sorted(_unique(r["depth"] for r in rows))
    cells = {(r["depth"], r["length"]): r[value] for r in rows}
    return lengths, depths, [[cells.get((d, n), float("nan")) for n in lengths] for d in depths]


def plot_passkey(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "passkey retrieval") -> Path:
    """A heatmap of accuracy: depth down, length across; writes a PNG."""
    path = Path(path)
    lengths, depths, grid = _depth_length_grid(rows, "accuracy")
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 2))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the key")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(data: Any, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def plot_needle(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    threshold: float | None = None,
    trained_length: int | None = None,
    title: str = "needle in a haystack",
) -> Path:
    """The needle heatmap: depth down, length across, score (% found) in each cell, red 0 to green 100.

    ``trained_length`` draws a dotted line after the last column within it; ``threshold`` puts the
    effective length in the title.
    """
    from .needle import effective_length

    path = Path(path)
    lengths, depths, grid = _depth_length_grid(rows, "score")
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 3, 0.5 * len(depths) + 2))
    image = ax.imshow(grid, vmin=0.0, vmax=100.0, cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    if trained_length is not None:
        inside = [j for j, n in enumerate(lengths) if n <= trained_length]
        if inside and inside[-1] < len(lengths) - 1:
            ax.axvline(inside[-1] + 0.5, color="black", linestyle=":", linewidth=1.5)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the needle")
    if threshold is not None:
        effective = effective_length(rows, threshold)
        title = f"{title}\neffective length ({threshold:g}%): {'none' if effective is None else format_length(effective)}"
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="needles found (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
