"""ALiBi (Press et al., 2022): no rotation; a per-head linear bias -m_h * (i - j) on the scores.

The patch swaps the rotary embedding for one that returns cos = 1, sin = 0 (the rotation
becomes the identity, bit for bit) and routes attention through the ``hf_longctx_alibi``
attention function, which adds the bias to the scaled scores and then runs the model's
previous attention implementation (eager or sdpa). Slopes follow the paper, and equal
BLOOM's for any head count: for the closest power of two n <= H, m_h = 2^(-8h/n); the
remaining heads take every other slope of the 2n sequence.

Every rotary embedding of the model is replaced, so NoPE layers and rotary layers alike see
no rotation; on a model with NoPE layers ``alibi.layers`` must say which layers get the bias
(``all``, or a list), the others keep plain attention.

A RoPE-trained model has never seen these biases: it needs fine-tuning after this patch.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ..config_base import SpecError
from ..families import get_family, text_config
from ..patching import Applied, Technique, register_technique
from .config import AlibiSpec
from .rope import require_rotary

ATTENTION_NAME = "hf_longctx_alibi"
SLOPES_ATTR = "hf_longctx_alibi_slopes"
BASE_IMPL_ATTR = "_hf_longctx_alibi_base"


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """ALiBi slopes ``[num_heads]`` in float32.

    Computed as float32 powers of a float32 base (as BLOOM does), so the values match
    BLOOM's bit for bit, not only to rounding.
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2.0 ** (-8.0 / closest), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, closest + 1, dtype=torch.int32))
    if closest < num_heads:
        # the remaining heads take the odd-numbered slopes of the 2n-head sequence 2^(-8h/(2n))
        extra_base = torch.tensor(2.0 ** (-4.0 / closest), dtype=torch.float32)
        odd = torch.arange(1, 2 * (num_heads - closest) + 1, 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra_base, odd)])
    return slopes.to(device)


def module_alibi_slopes(module: nn.Module) -> torch.Tensor | None:
    """The slopes of an ALiBi-patched attention module, or None if it is not patched."""
    return getattr(module, SLOPES_ATTR, None)


def alibi_bias(slopes: torch.Tensor, q_len: int, kv_len: int, device) -> torch.Tensor:
    """``[H, q_len, kv_len]`` float32 bias -m_h * (i - j); queries sit at kv_len - q_len + r."""
    i = torch.arange(kv_len - q_len, kv_len, device=device, dtype=torch.float32)
    j = torch.arange(kv_len, device=device, dtype=torch.float32)
    return -slopes.to(device)[:, None, None] * (i[:, None] - j[None, :])


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def alibi_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface function: the module's previous attention plus the ALiBi bias."""
    q_len, kv_len = query.shape[2], key.shape[2]
    bias = alibi_bias(module_alibi_slopes(module), q_len, kv_len, query.device)  # [H, N, M]
    if attention_mask is None:
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = allowed[None, None]
    if attention_mask.dtype == torch.bool:
        # finfo.min rather than -inf: fully padded query rows stay finite, as with eager masks.
        bias = bias[None].masked_fill(~attention_mask, torch.finfo(torch.float32).min)
    else:
        bias = bias[None] + attention_mask[..., -kv_len:].float()
    bias = bias.to(query.dtype)
    base = getattr(module, BASE_IMPL_ATTR)
    if base == "eager":
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, bias, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        _repeat_kv(key, groups),
        _repeat_kv(value, groups),
        attn_mask=bias,
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, alibi_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


class IdentityRotaryEmbedding(nn.Module):
    """Drop-in for a rotary embedding that rotates by zero: the original evaluated at position 0 for
    every token (cos = 1, sin = 0 in whatever layout, dimension or layer type the original has; its
    pass-through dimensions of partial rotary stay as they are)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.config = getattr(original, "config", None)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        return self.original(x, torch.zeros_like(position_ids), *args, **kwargs)


def biased_layers(model: nn.Module, section: AlibiSpec) -> list[int]:
    """Indices of the attention layers that get the bias; a SpecError for NoPE layers not asked about."""
    family = get_family(model)
    attention = family.attention_layer_indices(model)
    if section.layers is None:
        nope = family.nope_layers(model)
        if nope:
            raise SpecError(f"this {family.model_type} model has NoPE layers {nope} (no rotation to replace); "
                            "give 'alibi.layers': 'all' or the list of layers to bias")
        return attention
    if section.layers == "all":
        return attention
    unknown = [i for i in section.layers if i not in attention]
    if unknown:
        raise SpecError(f"'alibi.layers' = {section.layers!r} names layer {unknown[0]}; the attention layers are "
                        f"{attention}")
    return sorted(set(section.layers))


def _check(model: nn.Module, section: AlibiSpec, spec) -> None:
    require_rotary(model)
    biased_layers(model, section)


def _apply(model: nn.Module, section: AlibiSpec, spec) -> Applied:
    family = get_family(model)
    rotaries = family.rotary_embeddings(model)
    original_impl = model.config._attn_implementation
    # An attention backend that reads the slopes itself (hf_longctx.attention) stays in charge.
    keep_impl = getattr(AttentionInterface._global_mapping.get(original_impl), "reads_alibi_slopes", False)
    base_impl = original_impl if original_impl == "eager" else "sdpa"
    for path, rotary in rotaries.items():
        family.set_rotary_embedding(model, IdentityRotaryEmbedding(rotary), path)
    num_heads = text_config(model).num_attention_heads
    layers = family.layers(model)
    modules = [getattr(layers[i], family.attention_attr) for i in family.attention_layer_indices(model)]
    biased = set(biased_layers(model, section))
    for i, attn in zip(family.attention_layer_indices(model), modules):
        # unbiased layers (NoPE layers left out) keep plain attention: slopes of zero
        slopes = alibi_slopes(num_heads)
        setattr(attn, SLOPES_ATTR, slopes if i in biased else torch.zeros_like(slopes))
        setattr(attn, BASE_IMPL_ATTR, base_impl)
    if not keep_impl:
        model.set_attn_implementation(ATTENTION_NAME)

    def undo():
        if not keep_impl:
            model.set_attn_implementation(original_impl)
        for attn in modules:
            delattr(attn, SLOPES_ATTR)
            delattr(attn, BASE_IMPL_ATTR)
        for path, rotary in rotaries.items():
            family.set_rotary_embedding(model, rotary, path)

    return Applied(undo=undo)


register_technique(Technique(section="alibi", spec_class=AlibiSpec, apply=_apply, check=_check, order=15))
