"""Spec section ``attention``: backend choice, sliding window, attention sinks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config_base import SectionSpec, spec_field


@dataclass
class AttentionSpec(SectionSpec):
    section = "attention"

    backend: Literal["auto", "triton", "flex", "sdpa", "eager"] = spec_field(
        "auto",
        help="auto: Triton on CUDA, the blocked CPU path on the CPU; triton; flex (flex_attention + BlockMask); "
        "sdpa / eager: torch with the explicit mask. Padded batches always take the explicit-mask torch path.",
    )
    sliding_window: int | None = spec_field(None, help="Each query sees this many keys, itself included.")
    sink_tokens: int = spec_field(0, help="The first keys stay visible to every query (StreamingLLM mask).")
    learnable_sinks: bool = spec_field(False, help="Add one learnable sink logit per head (gpt-oss style).")

    def __post_init__(self):
        if self.sliding_window is not None:
            self._require(self.sliding_window >= 1, "sliding_window", "the window must be >= 1 token")
        self._require(self.sink_tokens >= 0, "sink_tokens", "must be >= 0")
        self._require(
            self.sink_tokens == 0 or self.sliding_window is not None,
            "sink_tokens",
            "needs 'attention.sliding_window': without a window every key is already visible",
        )
