"""Results saved one cell at a time, so that an interrupted evaluation resumes where it stopped.

A cell is one unit of work (a needle cell, one method's perplexity run, one harness task at one
length) under a key that names everything its result depends on. The store is one JSON file,
rewritten atomically after every cell: a run killed at any moment leaves the cells finished before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


class CellStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.cells: dict[str, Any] = {}
        if self.path.is_file():
            self.cells = json.loads(self.path.read_text(encoding="utf-8"))

    @staticmethod
    def key(*parts: Any) -> str:
        return "|".join(str(p) for p in parts)

    def get(self, key: str) -> Any:
        return self.cells.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.cells

    def put(self, key: str, value: Any) -> None:
        self.cells[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part = self.path.with_name(self.path.name + ".part")
        part.write_text(json.dumps(self.cells, indent=1) + "\n", encoding="utf-8")
        os.replace(part, self.path)

    def grid(self, method: str, key: Callable[[int, float], str], cell_type: type) -> tuple[Callable, Callable]:
        """The ``done`` and ``on_cell`` callbacks of a (length, depth) grid of one method, over this store.

        ``done(length, depth)`` rebuilds the finished cell as ``cell_type`` (None when it is not here);
        ``on_cell(cell)`` saves a cell under ``key(cell.length, cell.depth)`` with the method's name.
        """

        def done(length: int, depth: float):
            row = self.get(key(length, depth))
            return None if row is None else cell_type(**{k: v for k, v in row.items() if k != "method"})

        def on_cell(cell) -> None:
            self.put(key(cell.length, cell.depth), {"method": method, **cell.to_dict()})

        return done, on_cell
