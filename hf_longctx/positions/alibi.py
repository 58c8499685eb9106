"""ALiBi (Press et al., 2022): no rotation; a per-head linear bias -m_h * (i - j) on the scores.

The patch swaps the rotary embedding for one that returns cos = 1, sin = 0 (the rotation
becomes the identity, bit for bit) and routes attention through the ``hf_longctx_alibi``
attention function, which adds the bias to the scaled scores and then runs the model's
previous attention implementation (eager or sdpa). Slopes follow the paper, and equal
BLOOM's for any head count: for the closest power of two n <= H, m_h = 2^(-8h/n); the
remaining heads take every other slope of the 2n sequence.

A RoPE-trained model has never seen these biases: it needs fine-tuning after this patch.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ..families import get_family
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
    """Drop-in for a rotary embedding that rotates by zero: cos = 1, sin = 0."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.dim = 2 * original.inv_freq.shape[-1]
        self.config = original.config

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        shape = (*position_ids.shape, self.dim)
        return torch.ones(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device)


def _apply(model: nn.Module, section: AlibiSpec, spec) -> Applied:
    family = get_family(model)
    original_rotary = family.rotary_embedding(model)
    original_impl = model.config._attn_implementation
    # An attention backend that reads the slopes itself (hf_longctx.attention) stays in charge.
    keep_impl = getattr(AttentionInterface._global_mapping.get(original_impl), "reads_alibi_slopes", False)
    base_impl = original_impl if original_impl == "eager" else "sdpa"
    family.set_rotary_embedding(model, IdentityRotaryEmbedding(original_rotary))
    num_heads = model.config.num_attention_heads
    for attn in family.attention_modules(model):
        setattr(attn, SLOPES_ATTR, alibi_slopes(num_heads))
        setattr(attn, BASE_IMPL_ATTR, base_impl)
    if not keep_impl:
        model.set_attn_implementation(ATTENTION_NAME)

    def undo():
        if not keep_impl:
            model.set_attn_implementation(original_impl)
        for attn in family.attention_modules(model):
            delattr(attn, SLOPES_ATTR)
            delattr(attn, BASE_IMPL_ATTR)
        family.set_rotary_embedding(model, original_rotary)

    return Applied(undo=undo)


register_technique(
    Technique(section="alibi", spec_class=AlibiSpec, apply=_apply, check=lambda model, section, spec: require_rotary(model),
              order=15)
)
