"""Spec section ``loss``: the model's own causal-LM loss, computed in chunks over the hidden states."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import SectionSpec, spec_field


@dataclass
class LossSpec(SectionSpec):
    section = "loss"

    chunk_size: int = spec_field(
        4096, help="Tokens per chunk of the cross-entropy; the largest temporary is [chunk_size, vocab]."
    )

    def __post_init__(self):
        self._require(self.chunk_size >= 1, "chunk_size", "must be >= 1 token")
