"""Rotating cached keys by a change of position: the rotary part of a cached tensor, wherever a model keeps it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class RotaryLayout:
    """Where a layer's cached tensors hold the rotated part of its keys.

    ``tensor``: which of the two tensors a model passes to ``Cache.update`` holds it (``"keys"``, or
    ``"values"`` where multi-head latent attention caches the compressed latent as "keys" and the shared
    rotated key as "values"); ``start``: its first dim (MLA caches that concatenate ``k_nope`` and the
    rotated ``k_pe`` put it last); ``interleaved``: rotation pairs are adjacent dims ``(2i, 2i + 1)``
    (DeepSeek V2's complex rotation) instead of the halves ``(i, i + R/2)`` of transformers' rotate-half.
    """

    tensor: Literal["keys", "values"] = "keys"
    start: int = 0
    interleaved: bool = False


ROTATE_HALF = RotaryLayout()


def _pairs(x: torch.Tensor, half: int, layout: RotaryLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The two members of every rotation pair of ``x`` ``[..., D]``: views ``[..., R/2]`` each."""
    start = layout.start
    if layout.interleaved:
        return x[..., start : start + 2 * half : 2], x[..., start + 1 : start + 2 * half : 2]
    return x[..., start : start + half], x[..., start + half : start + 2 * half]


def rotate_keys(keys: torch.Tensor, angles: torch.Tensor, layout: RotaryLayout = ROTATE_HALF) -> torch.Tensor:
    """Rotate the rotary part of ``keys`` by ``angles`` (by default transformers' rotate-half convention on
    the first dims; ``layout`` says where the rotary part is and how its dims pair up).

    keys: ``[B, H, N, D]``; angles: ``[B, N, R/2]`` (radians, any float dtype; ``B`` may be 1) where
    ``R <= D`` is the rotary dimension; the other dims pass through. cos/sin are taken in the dtype of
    ``angles``, the rotation is computed in float32 and returned in ``keys.dtype``.
    """
    half = angles.shape[-1]
    cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]
    x = keys.float()
    x1, x2 = _pairs(x, half, layout)
    rotated = x.clone()
    r1, r2 = _pairs(rotated, half, layout)
    r1.copy_(x1 * cos - x2 * sin)
    r2.copy_(x2 * cos + x1 * sin)
    return rotated.to(keys.dtype)


def shift_factors(inv_freq: torch.Tensor, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation by ``delta`` positions as ``(cos - 1 [R/2], sin [R/2])`` of ``delta * inv_freq``.

    Computed in float64, returned in float32. ``cos - 1`` is formed as ``-2 sin^2(angle / 2)`` and
    applied as ``x + ((cos - 1) x - sin x')`` (:func:`shift_keys_`): the rounding is then relative
    to the small change, not to ``x``, so a key shifted by one position thousands of times stays as
    close to the exact rotation as float32 RoPE computed from scratch (``cos``/``sin`` stored
    as such would drift about four times further, see ``tests/test_streaming.py``).
    """
    angle = delta * inv_freq.double()
    return (-2 * (angle / 2).sin().square()).float(), angle.sin().float()


def shift_keys_(
    keys: torch.Tensor, cos_minus_one: torch.Tensor, sin: torch.Tensor, layout: RotaryLayout = ROTATE_HALF
) -> None:
    """Rotate the rotary part of ``keys`` ``[B, H, N, D]`` (where ``layout`` puts it) in place by the angles
    of :func:`shift_factors` (the same for every key); computed in float32, stored in ``keys.dtype``."""
    x1, x2 = _pairs(keys, sin.shape[-1], layout)
    change1 = (x1 * cos_minus_one).addcmul_(x2, sin, value=-1)
    change2 = (x2 * cos_minus_one).addcmul_(x1, sin)
    x1.add_(change1)
    x2.add_(change2)
