"""benchmarks/eval_tables.py: the tables of README and RESULTS.md come from the cells of `hf-longctx eval` runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cell(method, task, length, score, limit=1):
    return {"method": method, "task": task, "length": length, "limit": limit, "score": score, "samples": limit}


CELLS = [
    _cell("yarn-4x", "niah_single_1", 4096, 1.0),
    _cell("none", "niah_single_1", 4096, 0.0),
    _cell("none", "niah_single_1", 16384, 0.2),
    _cell("dual-chunk-8k", "niah_single_1", 16384, 1 / 3),
    _cell("none", "ruler_vt", 4096, None),
    # ruler_vt has nothing at 16k: the whole compact cell is "-"
]


def _table(tmp_path: Path, *flags: str) -> list[list[str]]:
    (tmp_path / "ruler").mkdir()
    cells = {f"harness|m|{c['method']}|{c['task']}|{c['length']}|1": c for c in CELLS}
    (tmp_path / "ruler" / "cells.json").write_text(json.dumps(cells))
    proc = subprocess.run([sys.executable, "benchmarks/eval_tables.py", str(tmp_path), *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| ") or line.startswith("|---")]  # fmt: skip


def test_compact_table_has_a_row_per_task_and_every_method_in_a_cell(tmp_path):
    rows = _table(tmp_path, "--compact")
    assert rows[0] == ["task", "4k", "16k"]
    body = {r[0]: r[1:] for r in rows[2:]}
    # method order: none, yarn-4x, dual-chunk-8k (the order of the five presets, whatever is present)
    assert body["`niah_single_1`"] == ["0 · 1 · -", "0.2 · - · 0.33"]
    assert body["`ruler_vt`"] == ["n/a · - · -", "-"]
    assert list(body) == ["`niah_single_1`", "`ruler_vt`"]


def test_compact_caption_names_the_method_order(tmp_path):
    (tmp_path / "ruler").mkdir()
    cells = {str(i): c for i, c in enumerate(CELLS)}
    (tmp_path / "ruler" / "cells.json").write_text(json.dumps(cells))
    out = subprocess.run([sys.executable, "benchmarks/eval_tables.py", str(tmp_path), "--compact"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip
    assert "each cell: none · yarn-4x · dual-chunk-8k" in out


def test_long_table_has_a_row_per_task_and_length(tmp_path):
    rows = _table(tmp_path)
    assert rows[0] == ["task", "length", "none", "yarn-4x", "dual-chunk-8k"]
    assert rows[2:] == [
        ["niah_single_1", "4k", "0.00", "1.00", "-"],
        ["niah_single_1", "16k", "0.20", "-", "0.33"],
        ["ruler_vt", "4k", "n/a", "-", "-"],
    ]
