"""Spec section ``streaming``: generate() with an attention-sink KV cache (StreamingLLM)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import SectionSpec, spec_field


@dataclass
class StreamingSpec(SectionSpec):
    section = "streaming"

    sink_tokens: int = spec_field(4, help="Number of initial tokens kept forever (the attention sinks).")
    window: int = spec_field(1020, help="Number of recent tokens kept, the current one included, sinks excluded.")
    prefill_chunk: int | None = spec_field(
        None, help="Tokens per chunk when an input overflows the cache (None: window // 8, at least 1)."
    )

    def __post_init__(self):
        self._require(self.sink_tokens >= 0, "sink_tokens", "must be >= 0")
        self._require(self.window >= 1, "window", "the window must be >= 1 token")
        self._require(
            self.prefill_chunk is None or 1 <= self.prefill_chunk <= self.window,
            "prefill_chunk",
            f"must be null or between 1 and the window ({self.window})",
        )
