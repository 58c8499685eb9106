"""The ``attention`` patch: sliding window, attention sinks and learnable sink logits as a backend.

``patch(model, {"attention": {...}})`` registers an ``AttentionInterface`` function and an
``AttentionMaskInterface`` function under one name per setting (``hf_longctx_attn_<backend>_w<W>_s<S>``;
without a mask function transformers would silently pass ``attention_mask=None``) and
switches the model to it with ``set_attn_implementation``; ``unpatch`` switches back to
the implementation the model had before (sdpa, eager, or ALiBi's).

Dispatch (semantics in :mod:`.functions`):

- ``sdpa`` / ``eager``: the mask function builds the explicit window + sink mask
  ``[B, 1, N, M]``; torch SDPA or eager math applies it.
- ``auto`` / ``triton`` / ``flex``: the mask function returns None whenever the kernel's
  own geometry is exact (no padding, keys are the tokens ``0..M-1`` with the queries last:
  prefill, chunked prefill and decode with a dynamic cache). The attention function then
  runs the kernel (``auto``: Triton on CUDA, the blocked O(N·W) path on the CPU) or flex,
  and turns packed ``position_ids`` (``DataCollatorWithFlattening``) into ``cu_seqlens``.
  flex_attention has no backward on the CPU, so there ``flex`` runs the kernels' blocked
  path whenever gradients are needed.
  Otherwise (a padded batch, a static cache) the mask function builds the explicit mask,
  and the attention function falls back to the torch path with it: the kernels have no
  padding mask.

An ALiBi-patched module (``hf_longctx.positions``) hands its slopes to the kernel as
``alibi_slopes`` (the torch path adds the bias); ``learnable_sinks`` registers a
``sinks`` parameter ``[num_attention_heads]`` on every attention module (gpt-oss style),
initialised to ``SINK_INIT`` so that the outputs are unchanged at first.
"""

from __future__ import annotations

import logging
from functools import lru_cache, partial

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask

from ..config_base import SpecError
from ..families import get_family
from ..patching import Applied, Technique, register_technique
from ..positions import module_alibi_slopes
from .config import AttentionSpec
from .functions import (causal_mask, cu_seqlens_of, dense_attention, flex_path, kernel_path, packed_documents,
                        window_sink_mask)

logger = logging.getLogger(__name__)

SINKS_PARAM = "sinks"
# exp(-25) ~ 1.4e-11 of the softmax mass: outputs move by far less than 1e-6 for any score >= -10,
# yet the gradient exp(-25) * (...) is a normal float32, so the logits do train (-inf would not).
SINK_INIT = -25.0
_TAGS = {"auto": "auto", "triton": "triton", "flex": "blockmask", "sdpa": "dense", "eager": "dense_eager"}
_DENSE_BACKENDS = ("sdpa", "eager")


def _structured_geometry(q_length, kv_length, q_offset, kv_offset, attention_mask) -> bool:
    """True when keys are exactly the tokens 0..M-1, queries are the last N and nothing is padded."""
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)):
        return False  # a static cache: offsets are tensors and the key buffer holds unfilled slots
    if kv_offset != 0 or q_offset + q_length != kv_length:
        return False
    return attention_mask is None or bool(attention_mask[:, -kv_length:].all())


@lru_cache(maxsize=None)
def attention_implementation(backend: str, sliding_window: int | None, sink_tokens: int) -> str:
    """Register (once per setting) the attention + mask function pair and return its name.

    The names avoid "sdpa", "flash" and "flex_attention": transformers runs availability
    checks for implementations whose names contain them.
    """
    name = f"hf_longctx_attn_{_TAGS[backend]}_w{sliding_window or 0}_s{sink_tokens}"

    def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                      mask_function=causal_mask_function, attention_mask=None, device="cpu", use_vmap=False,
                      **kwargs):
        """AttentionMaskInterface: None (kernel geometry is exact) or bool ``[B, 1, N, M]``."""
        if backend not in _DENSE_BACKENDS and _structured_geometry(q_length, kv_length, q_offset, kv_offset,
                                                                  attention_mask):
            return None
        base = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=False, use_vmap=use_vmap, device=device)
        return window_sink_mask(base, sliding_window, sink_tokens)

    def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                          **kwargs):
        """AttentionInterface: q ``[B, Hq, N, D]``, k/v ``[B, Hkv, M, D]`` -> ``([B, N, Hq, D], weights)``."""
        # Without a window of our own, a native one (Mistral, Qwen sliding layers) still applies.
        window = sliding_window if sliding_window is not None else kwargs.get("sliding_window")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        slopes = module_alibi_slopes(module)
        sinks = getattr(module, SINKS_PARAM, None)
        q_len, kv_len = query.shape[2], key.shape[2]
        dropout = dropout if module.training else 0.0
        documents = None
        if attention_mask is None:
            documents = packed_documents(position_ids, query.shape[0], q_len, kv_len)
        if backend in _DENSE_BACKENDS or attention_mask is not None or dropout > 0:  # the kernels have no dropout
            if attention_mask is None:
                attention_mask = window_sink_mask(causal_mask(q_len, kv_len, query.device, documents), window,
                                                  sink_tokens)
            return dense_attention(query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                   alibi_slopes=slopes, sink_logits=sinks, use_sdpa=backend != "eager")
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if backend == "flex" and (query.is_cuda or not needs_grad):  # flex has no backward on the CPU
            run = flex_path
        else:
            run = partial(kernel_path, backend="triton" if backend == "triton" else "auto")
        options = dict(scaling=scaling, window=window, sink_tokens=sink_tokens, alibi_slopes=slopes,
                       sink_logits=sinks)
        if documents is None:
            return run(query, key, value, cu_seqlens=None, **options), None
        # cu_seqlens describes one packed row: run the rows one by one.
        rows = [run(query[b:b + 1], key[b:b + 1], value[b:b + 1], cu_seqlens=cu_seqlens_of(documents[b]), **options)
                for b in range(query.shape[0])]
        return torch.cat(rows), None

    # The flag tells the ALiBi patch to leave this function in charge when applied after it.
    attention_forward.reads_alibi_slopes = True
    AttentionInterface.register(name, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_function)
    return name


def _check(model: nn.Module, section: AttentionSpec, spec) -> None:
    layer_types = getattr(model.config, "layer_types", None) or []
    if section.sliding_window is not None and "sliding_attention" in layer_types:
        raise SpecError(f"this {model.config.model_type} model already has sliding-window layers (layer_types "
                        f"{sorted(set(layer_types))}); 'attention.sliding_window' is allowed only on models whose "
                        "layers all use full attention")
    if section.learnable_sinks:
        for attn in get_family(model).attention_modules(model):
            if hasattr(attn, SINKS_PARAM):
                raise SpecError(f"{type(attn).__name__} already has a '{SINKS_PARAM}' attribute; "
                                "'attention.learnable_sinks' cannot add its own")


def _apply(model: nn.Module, section: AttentionSpec, spec) -> Applied:
    family = get_family(model)
    previous_impl = model.config._attn_implementation
    name = attention_implementation(section.backend, section.sliding_window, section.sink_tokens)
    if section.sliding_window is not None and getattr(model.config, "sliding_window", None) is not None:
        # The native window would AND with ours and its KV cache would evict the sink keys;
        # the config is restored by unpatch (patching keeps a snapshot).
        model.config.sliding_window = None
    modules = family.attention_modules(model)
    if section.learnable_sinks:
        for attn in modules:
            reference = next(attn.parameters())
            sinks = torch.full((model.config.num_attention_heads,), SINK_INIT, dtype=reference.dtype,
                               device=reference.device)
            attn.register_parameter(SINKS_PARAM, nn.Parameter(sinks))
    model.set_attn_implementation(name)
    logger.info("attention: %s (previous implementation %s)", name, previous_impl)

    def undo():
        model.set_attn_implementation(previous_impl)
        if section.learnable_sinks:
            for attn in modules:
                delattr(attn, SINKS_PARAM)

    return Applied(undo=undo)


def _native_config(model: nn.Module, params: dict) -> dict | None:
    """A plain sliding window is native for families whose config can hold one (Mistral, Qwen, Phi-3)."""
    section = AttentionSpec.from_dict(params)
    if section.sliding_window is None or section.sink_tokens or section.learnable_sinks:
        return None
    return get_family(model).sliding_window_config(model.config, section.sliding_window)


register_technique(
    Technique(section="attention", spec_class=AttentionSpec, apply=_apply, check=_check, order=20,
              native_config=_native_config)
)
