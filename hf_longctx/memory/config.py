"""Spec section ``memory``: Recurrent Memory Transformer (RMT) memory tokens."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import SectionSpec, spec_field


@dataclass
class MemorySpec(SectionSpec):
    """Recurrent memory: ``memory_tokens`` learned vectors read at the start of each segment and written at its end.

    Positions are segment-local: each segment sees positions ``0 .. segment_length + 2 * memory_tokens - 1``
    (read memory, tokens, write slots), so RoPE never extrapolates however long the input.
    See :mod:`hf_longctx.memory.model`.
    """

    section = "memory"
    conflicts = {"streaming": "both own the way long inputs are split"}

    memory_tokens: int = spec_field(16, help="Number of memory embeddings read and written per segment.")
    segment_length: int = spec_field(512, help="Real tokens per segment.")
    bptt_depth: int | None = spec_field(2, help="Segments the last loss back-propagates through (counted back from its segment); null for all.")

    def __post_init__(self):
        self._require(self.memory_tokens >= 0, "memory_tokens", "must be >= 0")
        self._require(self.segment_length >= 1, "segment_length", "must be >= 1")
        if self.bptt_depth is not None:
            self._require(self.bptt_depth >= 1, "bptt_depth", "must be >= 1, or null for full back-propagation")
