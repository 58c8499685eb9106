"""The ``extend`` patch: Self-Extend or Dual Chunk Attention as a transformers attention backend.

``patch(model, {"extend": {...}})`` registers an ``AttentionInterface`` function and an
``AttentionMaskInterface`` function under one name per setting (``hf_longctx_extend_<method>_...``)
and switches the model to it with ``set_attn_implementation``; ``unpatch`` switches back.

- The mask function returns no mask for full-attention layers, only an :class:`ExtendGeometry`
  holding which keys are padding; the attention function takes the queries' positions from
  ``position_ids`` and computes :func:`~hf_longctx.extend.attention.remapped_attention`.
- Layers with a native sliding window (Gemma 3's local layers, Qwen's window layers) see only
  positions within their window: they keep plain attention over their window, through the kernels
  (:func:`~hf_longctx.attention.functions.kernel_path`: O(N·W) on the CPU, Triton on CUDA) when the
  keys are exactly the tokens 0..M-1 (prefill, decode with a dynamic cache, no padding), else
  through transformers' own mask.

The rotary frequencies are read, at each call, from the rotary embedding the layer's positions
come from (the decoder's, or Gemma 3's per-layer-type buffers), so a ``rope`` section applied
before or after changes them as it should. Refused at patch time (SpecError): models without a
rotary embedding or whose attention does not go through the interface, interleaved rotary layouts,
multi-head latent attention, rope types whose frequencies change with the input length
(``dynamic``, ``longrope``), models whose every layer has a native window; and the sections
``alibi``, ``streaming`` and ``attention`` (see :class:`~hf_longctx.extend.config.ExtendSpec`).
"""

from __future__ import annotations

import logging
import sys
import weakref
from functools import lru_cache, partial
from typing import Any, Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask

from ..attention.functions import KernelGeometry, dense_attention, kernel_path, packed_documents, structured_geometry
from ..config_base import SpecError
from ..families import get_family, text_config
from ..patching import Applied, Technique, register_technique
from .attention import remapped_attention
from .config import ExtendSpec
from .rules import passes

logger = logging.getLogger(__name__)

# attention module -> a function giving the inv_freq its rotary positions use (filled while patched)
_FREQUENCIES: weakref.WeakKeyDictionary[nn.Module, Callable[[], torch.Tensor]] = weakref.WeakKeyDictionary()
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # their frequencies change with the input: cached keys would not match
_PROBE_TOKENS = 8


class ExtendGeometry:
    """What the mask function returns for a full-attention layer: the keys that are not padding."""

    def __init__(self, key_valid: torch.Tensor | None):
        self.key_valid = key_valid  # bool [B, M], or None when nothing is padded


def _key_valid(attention_mask, kv_length: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    valid = attention_mask[:, -kv_length:].bool()
    return None if bool(valid.all()) else valid


@lru_cache(maxsize=None)
def extend_implementation(method: str, params: tuple) -> str:
    """Register (once per setting) the attention + mask function pair and return its name."""
    spec = ExtendSpec(method=method, **dict(params))
    rules = passes(spec)
    name = "hf_longctx_extend_" + "_".join([method, *(f"{k}{v}" for k, v in params)])

    def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                      mask_function=causal_mask_function, attention_mask=None, local_size=None, device="cpu",
                      use_vmap=False, **kwargs):
        """AttentionMaskInterface: an ExtendGeometry (full-attention layers); for local ones a KernelGeometry
        when the kernels' geometry is exact, else transformers' bool mask."""
        if local_size is not None:
            if structured_geometry(q_length, kv_length, q_offset, kv_offset, attention_mask):
                return KernelGeometry(local_size)
            return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                             kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                             allow_is_causal_skip=False, use_vmap=use_vmap, device=device)
        if not (isinstance(q_offset, int) and isinstance(kv_offset, int)) or kv_offset != 0:
            raise ValueError("'extend' needs a cache that keeps every token in order (DynamicCache, the default): "
                             "a static or sliding cache hides where each key sits")
        return ExtendGeometry(_key_valid(attention_mask, kv_length))

    def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                          softcap=None, s_aux=None, position_ids=None, is_causal=None, **kwargs):
        """AttentionInterface: q ``[B, Hq, N, D]``, k/v ``[B, Hkv, M, D]`` -> ``([B, N, Hq, D], None)``."""
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        if softcap is not None or s_aux is not None:
            raise ValueError("'extend' does not support attention logit softcaps or sink logits (s_aux)")
        if dropout and module.training:
            raise ValueError("'extend' computes attention without dropout; set the model to eval() or "
                             "attention_dropout to 0")
        if isinstance(attention_mask, KernelGeometry):  # a native window over tokens 0..M-1: the kernels
            if position_ids is not None and packed_documents(position_ids, query.shape[0], query.shape[2],
                                                             key.shape[2]) is not None:
                raise ValueError("'extend' needs consecutive positions in each row (left padding is fine); packed "
                                 "documents or gaps in position_ids are not supported")
            return kernel_path(query, key, value, scaling=scaling, window=attention_mask.local_size, sink_tokens=0,
                               alibi_slopes=None, sink_logits=None, cu_seqlens=None, backend="auto"), None
        if not isinstance(attention_mask, ExtendGeometry):  # a layer with a native window: positions stay within it
            return dense_attention(query, key, value, attention_mask, scaling=scaling, dropout=0.0, alibi_slopes=None,
                                   sink_logits=None, use_sdpa=True)
        if position_ids is None:
            raise ValueError("'extend' reads the queries' positions from position_ids, which this model does not "
                             "pass to its attention")
        b, n, m = query.shape[0], query.shape[2], key.shape[2]
        q_pos = position_ids.to(device=query.device, dtype=torch.int64).expand(b, n)
        key_valid = attention_mask.key_valid
        steps = torch.arange(m, device=query.device)
        k_pos = q_pos[:, -1:] - (m - 1 - steps)
        consecutive = q_pos == k_pos[:, m - n:]
        if key_valid is not None:
            consecutive = consecutive | ~key_valid[:, m - n:]
        if not bool(consecutive.all()):
            raise ValueError("'extend' needs consecutive positions in each row (left padding is fine); packed "
                             "documents or gaps in position_ids are not supported")
        inv_freq = _FREQUENCIES[module]()
        out = remapped_attention(query, key, value, q_pos, k_pos, key_valid, rules, inv_freq, scaling=scaling)
        return out, None

    AttentionInterface.register(name, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_function)
    return name


def _section_params(section: ExtendSpec) -> tuple:
    keys = ("group_size", "window") if section.method == "self_extend" else ("chunk_size", "local_size")
    return tuple((k, getattr(section, k)) for k in keys)


def _rope_type(rotary: nn.Module, layer_type: str | None) -> str:
    types = getattr(rotary, "rope_type", "default")
    return types.get(layer_type, "default") if isinstance(types, dict) else types


def _frequency_getter(model: nn.Module, attn: nn.Module) -> Callable[[], torch.Tensor]:
    """inv_freq of the layer's rotary positions, looked up at each call (a later rope patch replaces the module)."""
    family = get_family(model)
    layer_type = getattr(attn, "layer_type", None)

    def inv_freq():
        rotary = family.rotary_embedding(model)
        kind = _rope_type(rotary, layer_type)
        if kind in _LENGTH_DEPENDENT_ROPE:
            raise ValueError(f"'extend' cannot remap positions under rope type '{kind}', whose frequencies change "
                             "with the input length")
        per_type = getattr(rotary, f"{layer_type}_inv_freq", None) if layer_type else None
        return per_type if per_type is not None else rotary.inv_freq

    return inv_freq


def _half_split_rotary(apply_rotary) -> bool:
    """Whether the modeling file's ``apply_rotary_pos_emb`` turns pair ``(d, d + D/2)`` by angle ``d`` (checked on
    numbers: the function may be wrapped for hub kernels)."""
    if apply_rotary is None:
        return False
    x = torch.linspace(-1.0, 1.0, 8).view(1, 1, 1, 8)
    angle = torch.linspace(0.1, 0.7, 4).view(1, 1, 4)
    cos, sin = torch.cat([angle, angle], dim=-1).cos(), torch.cat([angle, angle], dim=-1).sin()
    x1, x2 = x[..., :4], x[..., 4:]
    expected = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)
    try:
        turned = apply_rotary(x, x, cos, sin)[0]
    except Exception:  # noqa: BLE001  another signature: another layout
        return False
    return turned.shape == x.shape and torch.allclose(turned, expected, atol=1e-6)


def _check(model: nn.Module, section: ExtendSpec, spec) -> None:
    family = get_family(model)
    config = text_config(model)
    model_type = model.config.model_type
    rotary = family.rotary_embedding(model)
    if rotary is None or not hasattr(rotary, "inv_freq") and not any(
            hasattr(rotary, f"{t}_inv_freq") for t in family.layer_types(model)):
        raise SpecError(f"'extend' remaps rotary positions; model_type '{model_type}' has no rotary embedding")
    if getattr(config, "kv_lora_rank", None) is not None or getattr(config, "qk_rope_head_dim", None) is not None:
        raise SpecError(f"'extend' does not support multi-head latent attention (model_type '{model_type}'): its "
                        "keys carry a shared rotary part that the attention function does not see apart")
    attn = family.attention_modules(model)[0]
    if not _half_split_rotary(getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)):
        raise SpecError(f"'extend' re-rotates queries and keys in transformers' half-split rotary layout; "
                        f"model_type '{model_type}' rotates its own way")
    layer_types = family.layer_types(model)
    if getattr(config, "sliding_window", None) is not None and getattr(config, "layer_types", None) is None:
        raise SpecError(f"every layer of model_type '{model_type}' has a native sliding window "
                        f"({config.sliding_window}): its relative positions never exceed it, there is nothing to extend")
    rope = spec.rope.type if spec.rope is not None else None
    kinds = {rope} | {_rope_type(rotary, t) for t in layer_types}
    bad = sorted(k for k in kinds if k in _LENGTH_DEPENDENT_ROPE)
    if bad:
        raise SpecError(f"'extend' cannot remap positions under rope type '{bad[0]}', whose frequencies change with "
                        "the input length; use a fixed one (linear, ntk, yarn, llama3) or none")


@torch.no_grad()
def _probe_logits(model: nn.Module) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(torch.arange(3, 3 + _PROBE_TOKENS, device=model.device)[None], use_cache=False).logits.float()
    finally:
        model.train(was_training)


def _apply(model: nn.Module, section: ExtendSpec, spec) -> Applied:
    family = get_family(model)
    previous_impl = model.config._attn_implementation
    modules = family.attention_modules(model)
    reference = _probe_logits(model)
    for attn in modules:
        _FREQUENCIES[attn] = _frequency_getter(model, attn)
    model.set_attn_implementation(extend_implementation(section.method, _section_params(section)))
    logger.info("extend: %s %s (previous implementation %s)", section.method, dict(_section_params(section)),
                previous_impl)

    def undo():
        model.set_attn_implementation(previous_impl)
        for attn in modules:
            _FREQUENCIES.pop(attn, None)

    try:
        logits = _probe_logits(model)
    except Exception as err:  # noqa: BLE001  the family's attention cannot run through the function
        undo()
        raise SpecError(f"'extend' is not supported for model_type '{model.config.model_type}': its attention fails "
                        f"through hf_longctx's function ({type(err).__name__}: {err})") from err
    exact_span = section.window if section.method == "self_extend" else section.chunk_size - section.local_size
    tolerance = 1e-4 if model.dtype in (torch.float32, torch.float64) else 3e-2
    error = ((logits - reference).abs().max() / reference.abs().max().clamp(min=1e-6)).item()
    if exact_span >= _PROBE_TOKENS and not error <= tolerance:
        undo()
        raise SpecError(f"'extend' is not supported for model_type '{model.config.model_type}': inside the exact span "
                        f"its attention does not give the model's own result (relative difference {error:.2g})")
    return Applied(undo=undo)


def dual_chunk_config(model: nn.Module, params: dict[str, Any]) -> dict[str, Any] | None:
    """``dual_chunk_attention_config`` as Qwen2.5-1M checkpoints carry it (read by serving engines)."""
    section = ExtendSpec.from_dict(params)
    if section.method != "dual_chunk":
        return None
    config = text_config(model)
    trained = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
    return {"dual_chunk_attention_config": {"chunk_size": section.chunk_size, "local_size": section.local_size,
                                            "original_max_position_embeddings": trained}}


def section_from_dual_chunk_config(config: dict[str, Any]) -> dict[str, Any]:
    """The ``extend`` section a checkpoint's ``dual_chunk_attention_config`` describes."""
    return {"method": "dual_chunk", "chunk_size": int(config["chunk_size"]), "local_size": int(config["local_size"])}


def _card(params: dict[str, Any]) -> list[str]:
    section = ExtendSpec.from_dict(params)
    return [f"training-free context extension: {section.method} {dict(_section_params(section))}"]


register_technique(
    Technique(section="extend", spec_class=ExtendSpec, apply=_apply, check=_check, order=22,
              native_config=dual_chunk_config, card=_card)
)
