"""Spec sections for positions: ``rope`` (RoPE scaling) and ``alibi`` (linear attention biases)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config_base import SectionSpec, spec_field

ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")

# Keys that only make sense for one rope type; everything else is common to all types.
TYPE_KEYS = {
    "linear": set(),
    "ntk": set(),
    "dynamic": set(),
    "yarn": {"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"},
    "llama3": {"low_freq_factor", "high_freq_factor"},
    "longrope": {"short_factor", "long_factor", "attention_factor"},
}


@dataclass
class RopeSpec(SectionSpec):
    """RoPE scaling. Give ``factor`` or ``target_context`` (factor = target_context / the length it scales from:
    the current context, or the original one with ``mode: replace``)."""

    section = "rope"
    conflicts = {"alibi": "ALiBi replaces the rotary embedding"}

    type: Literal["linear", "ntk", "dynamic", "yarn", "llama3", "longrope"] | None = spec_field(
        None, help="Scaling method: linear (position interpolation), ntk (static NTK-aware theta), dynamic NTK, "
        "yarn, llama3 or longrope."
    )
    factor: float | None = spec_field(None, help="Context extension factor (>= 1).")
    target_context: int | None = spec_field(
        None, help="Context length to reach; the factor is derived from the model's trained length."
    )
    original_max_position_embeddings: int | None = spec_field(
        None, help="Length the factor scales from; defaults to the model's current context (max_position_embeddings), "
        "or with mode: replace to its original_max_position_embeddings."
    )
    beta_fast: float | None = spec_field(None, help="yarn: extrapolation boundary of the ramp (default 32).")
    beta_slow: float | None = spec_field(None, help="yarn: interpolation boundary of the ramp (default 1).")
    attention_factor: float | None = spec_field(None, help="yarn/longrope: scale of cos/sin (default from factor).")
    mscale: float | None = spec_field(None, help="yarn: mscale (DeepSeek style attention factor).")
    mscale_all_dim: float | None = spec_field(None, help="yarn: mscale_all_dim (DeepSeek style attention factor).")
    truncate: bool | None = spec_field(None, help="yarn: truncate the correction range (default true).")
    low_freq_factor: float = spec_field(1.0, help="llama3: low-frequency factor.")
    high_freq_factor: float = spec_field(4.0, help="llama3: high-frequency factor.")
    short_factor: list[float] | None = spec_field(None, help="longrope: per-frequency factors below the trained length.")
    long_factor: list[float] | None = spec_field(None, help="longrope: per-frequency factors beyond the trained length.")
    mode: Literal["stack", "replace"] = spec_field(
        "stack", help="On a model whose rope is already scaled: 'stack' scales the current frequencies relative to "
        "the current context (max_position_embeddings); 'replace' discards the shipped scaling and scales the "
        "unscaled frequencies relative to original_max_position_embeddings.",
    )
    layer_types: list[str] | None = spec_field(
        None, help="Models with one rotation per layer type (Gemma 3): the types to scale (default: full_attention)."
    )

    def __post_init__(self):
        self._require(self.type is not None, "type", f"a rope section needs a type, one of {', '.join(ROPE_TYPES)}")
        self._require(
            (self.factor is None) != (self.target_context is None),
            "factor",
            "give exactly one of 'rope.factor' and 'rope.target_context'",
        )
        if self.factor is not None:
            self._require(self.factor >= 1.0, "factor", "the factor must be >= 1 (1 keeps the trained context)")
        if self.target_context is not None:
            self._require(self.target_context >= 1, "target_context", "must be a positive number of tokens")
        if self.original_max_position_embeddings is not None:
            self._require(self.original_max_position_embeddings >= 1, "original_max_position_embeddings", "must be >= 1")
        for key in set().union(*TYPE_KEYS.values()) - TYPE_KEYS[self.type]:
            default = type(self).__dataclass_fields__[key].default
            owners = [t for t, keys in TYPE_KEYS.items() if key in keys]
            self._require(
                getattr(self, key) == default, key, f"only used by rope type(s) {', '.join(owners)}, not '{self.type}'"
            )
        if self.type == "longrope":
            self._require(
                self.short_factor is not None and self.long_factor is not None,
                "short_factor",
                "longrope needs both short_factor and long_factor (one value per rotary frequency)",
            )
        if self.type == "llama3":
            self._require(self.high_freq_factor > self.low_freq_factor, "high_freq_factor", "must exceed low_freq_factor")
        if self.layer_types is not None:
            self._require(len(self.layer_types) > 0, "layer_types", "name at least one layer type, e.g. full_attention")


@dataclass
class AlibiSpec(SectionSpec):
    """ALiBi (Press et al.): no rotation, a bias -m_h * (i - j) per head. Needs fine-tuning on a RoPE model."""

    section = "alibi"

    layers: Literal["all"] | list[int] | None = spec_field(
        None, help="Layers to bias: 'all' or a list of indices. Default: every layer, refused on models with NoPE "
        "layers, which must be named here (or 'all') to be biased.",
    )

    def __post_init__(self):
        if isinstance(self.layers, list):
            self._require(all(i >= 0 for i in self.layers), "layers", "layer indices must be >= 0")
