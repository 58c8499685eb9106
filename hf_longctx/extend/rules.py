"""The position rules of Self-Extend and Dual Chunk Attention, as passes over the keys.

A rule gives, for a query at position i and a key at position j <= i, the rotary relative
position the score is computed with. Each rule here splits the keys of a query into disjoint
intervals of positions (:class:`Pass`); inside one interval the query and the key each move to a
new position that depends on themselves only, so the score is the plain dot product of the query
and the key re-rotated to those positions.

Self-Extend (Jin et al. 2024, "LLM Maybe LongLM", the rule of its reference code), window W and group G:

- neighbor, i - W < j <= i: query at i, key at j (relative i - j, exact);
- grouped, j <= i - W: query at ``i // G + W - W // G``, key at ``j // G`` (relative
  ``i // G - j // G + W - W // G``, at least ``W - W // G`` and at most ``(T - 1) // G + W - W // G``).

Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models"),
in the form Qwen2.5-1M's ``dual_chunk_attention_config`` describes and its serving engines compute:
with ``L = chunk_size - local_size``, keys sit at ``j mod L`` and, with chunks ``c(p) = p // L``,

- intra-chunk, c(j) = c(i): query at ``i mod L`` (relative i - j, exact);
- successive-chunk, c(j) = c(i) - 1: query at ``min(i mod L + L, chunk_size)``;
- inter-chunk, c(j) <= c(i) - 2: query at ``min(2L - 1, chunk_size)``.

No relative position exceeds ``chunk_size`` however long the input is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import ExtendSpec

Positions = Callable[[torch.Tensor], torch.Tensor]  # int64 positions -> int64 positions, elementwise

_FAR = -(1 << 62)  # "no lower bound" for a position interval


@dataclass(frozen=True)
class Pass:
    """One part of the keys: the query and key positions it uses and which keys it owns.

    ``query``/``key`` map the tokens' positions to the positions the rotation uses (None: unchanged);
    ``keys(i)`` gives the inclusive interval ``(lo, hi)`` of key positions the query at ``i`` owns here.
    """

    name: str
    query: Positions | None
    key: Positions | None
    keys: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    band: int | None = None  # the pass owns keys i - band < j <= i (a sliding window)
    lag: int | None = None  # the pass owns keys j <= i - lag


def passes(spec: ExtendSpec) -> tuple[Pass, ...]:
    """The passes of a rule; together they cover every key ``j <= i`` of a query exactly once."""
    if spec.method == "self_extend":
        g, w = spec.group_size, spec.window
        return (
            Pass("neighbor", None, None, lambda i: (i - w + 1, i), band=w),
            Pass("grouped", lambda i: torch.div(i, g, rounding_mode="floor") + (w - w // g),
                 lambda j: torch.div(j, g, rounding_mode="floor"), lambda i: (torch.full_like(i, _FAR), i - w), lag=w),
        )
    chunk_len = spec.chunk_size - spec.local_size

    def start(i):  # first position of the chunk of i
        return torch.div(i, chunk_len, rounding_mode="floor") * chunk_len

    def in_chunk(p):
        return torch.remainder(p, chunk_len)

    return (
        Pass("intra", in_chunk, in_chunk, lambda i: (start(i), i)),
        Pass("successive", lambda i: (in_chunk(i) + chunk_len).clamp(max=spec.chunk_size), in_chunk,
             lambda i: (start(i) - chunk_len, start(i) - 1)),
        Pass("inter", lambda i: torch.full_like(i, min(2 * chunk_len - 1, spec.chunk_size)), in_chunk,
             lambda i: (torch.full_like(i, _FAR), start(i) - chunk_len - 1)),
    )
