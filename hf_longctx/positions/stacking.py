"""Stacking a rope section onto a rope that is already scaled (Llama 3.x, Gemma 3, gpt-oss, Phi-3.5, ...).

A shipped long-context checkpoint rotates with frequencies ``w`` (one per rotary pair) that its own
scaling produced, times an attention factor ``a`` on cos/sin, and it was trained (or extended) to its
current context ``L`` = ``max_position_embeddings``. A stacked section of factor ``f`` is defined relative
to that state, per frequency: it divides each current frequency by ``s_i`` and multiplies the attention
factor by ``m``, and the context becomes ``L * f``:

==========  ===========================================================================================
linear      ``s_i = f``; ``m = 1``
ntk         ``s_i = f ** (2i / (d - 2))`` (``i`` = 0 .. d/2-1 over the ``d`` rotary dims): the fastest
            frequency is kept, the slowest divided by ``f``; on an unscaled rope this is exactly
            ``theta * f ** (d / (d - 2))``. ``m = 1``
yarn        with ``r_i = L * w_i / (2 pi)`` the rotations of frequency ``i`` within the current context and
            ``g_i = clamp((ln r_i - ln beta_slow) / (ln beta_fast - ln beta_slow), 0, 1)``:
            ``w_i' = w_i * (g_i + (1 - g_i) / f)``, so frequencies with ``r >= beta_fast`` (32) are kept and
            those with ``r <= beta_slow`` (1) divided by ``f``; ``m = attention_factor`` if given, else
            ``mscale(f, mscale) / mscale(f, mscale_all_dim)`` if both are given, else ``0.1 ln f + 1``.
            On an unscaled rope this is transformers' yarn with ``truncate: false``.
llama3      with wavelengths ``l_i = 2 pi / w_i``: ``l_i < L / high_freq_factor`` kept, ``l_i > L /
            low_freq_factor`` divided by ``f``, in between the smooth blend of transformers' llama3 with
            ``L`` as its original context; ``m = 1``
dynamic     at a sequence of ``n > L`` tokens, ``ntk`` with ``f' = f n / L - (f - 1)``, the frequencies
            cached for the longest sequence seen as transformers' dynamic NTK does; ``L`` stays the context
longrope    ``s_i = short_factor[i]`` up to ``L`` tokens, ``long_factor[i]`` beyond; ``m =
            attention_factor`` if given, else ``sqrt(1 + ln f / ln L)``
==========  ===========================================================================================

A rope that already switches at its original length (LongRoPE: a short and a long list) gets the same
``s`` on both lists, computed from the long list (the frequencies in use at the current context), and its
switch point moves from ``o`` to ``o * f``. A ``dynamic`` or ``longrope`` section on a LongRoPE keeps the
shipped switch at ``o`` and adds its own at ``L`` (dynamic NTK on the long list beyond ``L``; the section's
short list up to ``L``, its long list beyond). A model with a dynamic rope is refused (its frequencies are
a function of the length, not a state to stack on).

Native form. A static result is one set of frequencies per length regime and one attention factor:
transformers' ``longrope`` holds exactly that (``short_factor``/``long_factor`` the ratios of the unscaled
frequencies to the stacked ones, an explicit ``attention_factor``, repeated as ``short_mscale`` / ``long_mscale``,
the keys vLLM and SGLang read for the same value), and linear on ``linear`` or
``proportional`` is the same type with the factors multiplied. Each candidate is computed with
transformers' own rope function and used only when it reproduces the stacked frequencies; otherwise (and
for ``dynamic`` on top) the rotary modules are rebuilt from the shipped config and given the stacked
frequencies in memory (a :class:`LengthRule` where they follow the length), and
``hf_longctx.from_pretrained`` re-applies the patch after loading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..config_base import SpecError

STATIC_TYPES = ("linear", "ntk", "yarn", "llama3")


@dataclass(frozen=True)
class Frequencies:
    """The rotation of one layer type: ``short`` up to ``switch`` tokens, ``long`` beyond (None: static)."""

    short: torch.Tensor  # float64 [d/2]
    attention: float
    long: torch.Tensor | None = None
    switch: int | None = None

    def at_context(self) -> torch.Tensor:
        """The frequencies in use at the current context (the long list where there are two)."""
        return self.short if self.long is None else self.long

    def divided(self, divisors: torch.Tensor, multiplier: float, switch_factor: float) -> "Frequencies":
        long = None if self.long is None else self.long / divisors
        switch = None if self.switch is None else int(round(self.switch * switch_factor))
        return Frequencies(self.short / divisors, self.attention * multiplier, long, switch)


def rotary_count(inv_freq: torch.Tensor) -> int:
    """Rotary pairs that rotate (``proportional`` pads the pass-through pairs with zero frequencies)."""
    return int((inv_freq != 0).sum())


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def divisors(section, inv_freq: torch.Tensor, context: int, factor: float) -> tuple[torch.Tensor, float]:
    """``(s, m)`` of a static section on the frequencies ``inv_freq`` in use at ``context`` tokens."""
    w = inv_freq.double()
    if section.type == "linear":
        return torch.full_like(w, factor), 1.0
    if section.type == "ntk":
        n = rotary_count(w)
        exponent = torch.arange(w.numel(), dtype=torch.float64).clamp(max=max(n - 1, 0)) * 2 / max(2 * n - 2, 1)
        return torch.where(w != 0, factor ** exponent, torch.ones_like(w)), 1.0
    if section.type == "yarn":
        fast, slow = section.beta_fast or 32.0, section.beta_slow or 1.0
        rotations = context * w / (2 * math.pi)
        ramp = ((rotations.log() - math.log(slow)) / (math.log(fast) - math.log(slow))).clamp(0, 1)
        if section.attention_factor is not None:
            multiplier = float(section.attention_factor)
        elif section.mscale and section.mscale_all_dim:
            multiplier = yarn_mscale(factor, section.mscale) / yarn_mscale(factor, section.mscale_all_dim)
        else:
            multiplier = yarn_mscale(factor)
        return 1.0 / (ramp + (1 - ramp) / factor), multiplier
    if section.type == "llama3":
        low, high = section.low_freq_factor, section.high_freq_factor
        wavelength = 2 * math.pi / w
        smooth = (context / wavelength - low) / (high - low)
        scale = torch.where(wavelength > context / low, torch.full_like(w, 1 / factor), torch.ones_like(w))
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        scale = torch.where(medium, (1 - smooth) / factor + smooth, scale)
        return 1.0 / scale, 1.0
    raise ValueError(f"no static divisors for rope type {section.type!r}")


def dynamic_divisors(inv_freq: torch.Tensor, context: int, factor: float, length: int) -> torch.Tensor:
    """Dynamic NTK's divisors at ``length`` tokens: ntk with ``f * length / context - (f - 1)``."""
    effective = factor * max(length, context) / context - (factor - 1)
    n = rotary_count(inv_freq)
    exponent = torch.arange(inv_freq.numel(), dtype=torch.float64).clamp(max=max(n - 1, 0)) * 2 / max(2 * n - 2, 1)
    return torch.where(inv_freq != 0, effective ** exponent, torch.ones_like(exponent))


@dataclass(frozen=True)
class LengthRule:
    """Frequencies that follow the sequence length where no rope type of transformers holds them: ``dynamic``
    on a scaled rope, ``longrope`` on a LongRoPE (its switch at the shipped original length and the section's
    at the current context), both in memory."""

    current: Frequencies
    context: int
    factor: float
    attention: float
    dynamic: bool = False
    lists: tuple[torch.Tensor, torch.Tensor] | None = None  # a longrope section's short / long divisors

    def at(self, length: int) -> torch.Tensor:
        """The frequencies at a sequence of ``length`` tokens (before dynamic NTK's caching of the longest)."""
        current = self.current
        base = current.short if current.long is None or length <= current.switch else current.long
        if self.lists is not None:
            base = base / (self.lists[0] if length <= self.context else self.lists[1])
        if self.dynamic and length > self.context:
            base = base / dynamic_divisors(base, self.context, self.factor, length)
        return base


def length_rule(section, current: Frequencies, context: int, factor: float) -> LengthRule:
    """The in-memory rule of a ``dynamic`` or ``longrope`` section stacked on ``current``."""
    if section.type == "dynamic":
        return LengthRule(current, context, factor, current.attention, dynamic=True)
    result = stacked(section, Frequencies(torch.ones_like(current.short), 1.0), context, factor)
    lists = (1.0 / result.short, 1.0 / result.long)
    return LengthRule(current, context, factor, current.attention * result.attention, lists=lists)


def stacked(section, current: Frequencies, context: int, factor: float) -> Frequencies:
    """The frequencies of a static or longrope section stacked on ``current`` (refusals as SpecError)."""
    if section.type in STATIC_TYPES:
        if section.type == "yarn" and section.truncate:
            raise SpecError("'rope.truncate' = True: a stacked yarn ramps continuously over the rotations of the "
                            "current frequencies (transformers' truncate: false); leave the key out or use mode: replace")
        s, m = divisors(section, current.at_context(), context, factor)
        return current.divided(s, m, factor)
    if section.type == "longrope":
        if current.long is not None:
            raise ValueError("a longrope section on a LongRoPE is a length rule (length_rule)")
        short = torch.tensor(section.short_factor, dtype=torch.float64)
        long = torch.tensor(section.long_factor, dtype=torch.float64)
        if section.attention_factor is not None:
            multiplier = float(section.attention_factor)
        else:
            multiplier = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(context))
        return Frequencies(current.short / short, current.attention * multiplier, current.short / long, context)
    raise ValueError(section.type)


# ---------------------------------------------------------------- reading the current rotation


def _buffer(rotary: nn.Module, name: str, layer_type: str | None) -> torch.Tensor | None:
    prefix = "" if layer_type is None else f"{layer_type}_"
    for candidate in (f"{prefix}original_inv_freq", f"{prefix}inv_freq"):
        value = getattr(rotary, candidate, None)
        if isinstance(value, torch.Tensor):
            return value
    return None


def current_frequencies(rotary: nn.Module, config, params: dict, layer_type: str | None) -> Frequencies:
    """The rotation a rotary module applies for one layer type (None: flat config), as it was built."""
    inv_freq = _buffer(rotary, "inv_freq", layer_type)
    if inv_freq is None:
        raise SpecError(f"the rotary embedding {type(rotary).__name__} has no inv_freq buffer to stack a rope on")
    prefix = "" if layer_type is None else f"{layer_type}_"
    attention = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
    rope_type = params.get("rope_type", "default")
    if "dynamic" in rope_type:
        raise SpecError(f"the model's rope_type '{rope_type}' changes its frequencies with the sequence length, so "
                        "there is no rotation to stack a section on; use mode: replace to rescale the unscaled rope")
    if rope_type != "longrope":
        return Frequencies(inv_freq.detach().double().cpu(), attention)
    switch = int(params["original_max_position_embeddings"])
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=switch + 1, **kwargs)
    return Frequencies(inv_freq.detach().double().cpu(), attention, long.double(), switch)


def unscaled_powers(params: dict, dim: int) -> torch.Tensor:
    """``theta ** (2i / d)`` as transformers' longrope computes it (float32)."""
    return params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)


def exact_factors(frequencies: torch.Tensor, powers: torch.Tensor) -> list[float]:
    """LongRoPE factors ``e`` for which transformers' ``1 / (e * powers)`` (float32) gives the float32 value of
    each wanted frequency exactly where one does (a few float32 steps around ``1 / (f * p)``), else the nearest:
    so a linear x2 on top rotates 2p by exactly the angle the shipped model gives p."""
    wanted = frequencies.float()
    start = (1.0 / (frequencies * powers.double())).float()
    best, best_error = start.clone(), torch.full_like(wanted, float("inf"))
    for direction in (float("inf"), float("-inf")):
        candidate = start.clone()
        for _ in range(8):
            error = ((1.0 / (candidate * powers)) - wanted).abs()
            better = error < best_error
            best, best_error = torch.where(better, candidate, best), torch.where(better, error, best_error)
            candidate = torch.nextafter(candidate, torch.full_like(candidate, direction))
    return [float(x) for x in best]


# Keys of rope_parameters that some rope type reads; any other key (Ministral 3's llama_4_scaling_beta, read by
# its attention) belongs to the family and is kept as shipped.
ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
             "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate", "low_freq_factor",
             "high_freq_factor", "short_factor", "long_factor", "short_mscale", "long_mscale"}


def family_keys(params: dict) -> dict:
    """The shipped keys that no rope type reads (kept through any rescaling)."""
    return {k: v for k, v in params.items() if k not in ROPE_KEYS}


def longrope_params(params: dict, result: Frequencies, dim: int, context: int, new_context: int) -> dict:
    """``rope_parameters`` of transformers' longrope that rotate by ``result`` (equal lists when static).

    A static result switches nowhere: its ``original_max_position_embeddings`` stays the shipped one (a
    family's attention may read it, as Ministral 3's query scaling does)."""
    powers = unscaled_powers(params, dim)
    long = result.short if result.long is None else result.long
    switch = result.switch if result.switch is not None else (params.get("original_max_position_embeddings") or context)
    out = {k: params[k] for k in ("rope_theta", "partial_rotary_factor") if k in params}
    out.update(family_keys(params))
    out.update(
        rope_type="longrope",
        short_factor=exact_factors(result.short, powers),
        long_factor=exact_factors(long, powers),
        original_max_position_embeddings=switch,
        factor=new_context / switch,
        attention_factor=float(result.attention),
        # vLLM and SGLang ignore attention_factor for longrope and read these (else they compute their own);
        # transformers reads attention_factor: both name the same value
        short_mscale=float(result.attention),
        long_mscale=float(result.attention),
    )
    return out


def same_rotation(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> bool:
    a, b = a.double().cpu(), b.double().cpu()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=0.0))
