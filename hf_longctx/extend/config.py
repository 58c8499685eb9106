"""Spec section ``extend``: training-free context extension by remapping relative positions in attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config_base import SectionSpec, spec_field


@dataclass
class ExtendSpec(SectionSpec):
    """Self-Extend (Jin et al. 2024) or Dual Chunk Attention (An et al. 2024; Qwen2.5-1M's form)."""

    section = "extend"
    conflicts = {
        "alibi": "ALiBi replaces the rotary embedding whose positions 'extend' remaps",
        "streaming": "the streaming cache renumbers positions as cache slots; 'extend' needs the tokens' own positions",
        "attention": "both install their own attention function; use one of them",
    }

    method: Literal["self_extend", "dual_chunk"] = spec_field(
        "self_extend", help="self_extend: neighbor window + grouped positions; dual_chunk: intra-, successive- and "
        "inter-chunk attention with positions inside a chunk."
    )
    group_size: int | None = spec_field(None, help="self_extend: G, keys beyond the window are grouped by floor(p / G).")
    window: int | None = spec_field(None, help="self_extend: W, keys with i - j < W keep their exact relative position.")
    chunk_size: int | None = spec_field(
        None, help="dual_chunk: the largest position a query may take (Qwen's chunk_size; at most the trained length)."
    )
    local_size: int | None = spec_field(
        None, help="dual_chunk: keys are numbered inside chunks of chunk_size - local_size tokens (Qwen's local_size)."
    )

    def __post_init__(self):
        if self.method == "self_extend":
            for key in ("chunk_size", "local_size"):
                self._require(getattr(self, key) is None, key, "only for method 'dual_chunk'")
            self._require(self.group_size is not None and self.group_size >= 1, "group_size",
                          "self_extend needs an int group_size >= 1")
            self._require(self.window is not None and self.window >= 1, "window", "self_extend needs an int window >= 1")
        else:
            for key in ("group_size", "window"):
                self._require(getattr(self, key) is None, key, "only for method 'self_extend'")
            self._require(self.chunk_size is not None and self.chunk_size >= 2, "chunk_size",
                          "dual_chunk needs an int chunk_size >= 2")
            self._require(self.local_size is not None and 0 <= self.local_size < self.chunk_size, "local_size",
                          f"dual_chunk needs an int local_size with 0 <= local_size < chunk_size ({self.chunk_size})")
