"""Spec section ``memory``: Recurrent Memory Transformer (RMT) memory tokens."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import SectionSpec, spec_field


@dataclass
class MemorySpec(SectionSpec):
    section = "memory"

    memory_tokens: int = spec_field(16, help="Number of memory embeddings read and written per segment.")
    segment_length: int = spec_field(512, help="Real tokens per segment.")
    bptt_depth: int | None = spec_field(2, help="Segments a loss back-propagates through; null for all.")

    def __post_init__(self):
        self._require(self.memory_tokens >= 0, "memory_tokens", "must be >= 0")
        self._require(self.segment_length >= 1, "segment_length", "must be >= 1")
        if self.bptt_depth is not None:
            self._require(self.bptt_depth >= 1, "bptt_depth", "must be >= 1, or null for full back-propagation")
