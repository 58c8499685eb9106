"""The ``attention`` patch: sliding window, attention sinks and learnable sink logits as a backend.

``patch(model, {"attention": {...}})`` registers an ``AttentionInterface`` function and an
``AttentionMaskInterface`` function under one name per setting (``hf_longctx_attn_<backend>_w<W>_s<S>``;
without a mask function transformers would silently pass ``attention_mask=None``) and
switches the model to it with ``set_attn_implementation``; ``unpatch`` switches back to
the implementation the model had before (sdpa, eager, or ALiBi's).

Dispatch (semantics in :mod:`.functions`):

- ``sdpa`` / ``eager``: the mask function builds the explicit window + sink mask
  ``[B, 1, N, M]``; torch SDPA or eager math applies it.
- ``auto`` / ``triton`` / ``flex``: the mask function returns no mask (a :class:`KernelGeometry`
  carrying the layers' native window) whenever the kernel's
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

import functools
import logging
from functools import lru_cache, partial

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask

from .. import compat
from ..config_base import SpecError
from ..families import get_family
from ..patching import Applied, Technique, Wrap, register_technique
from ..positions import module_alibi_slopes
from .config import AttentionSpec
from .functions import (KernelGeometry, causal_mask, cu_seqlens_of, dense_attention, flex_path, kernel_path,
                        packed_documents, structured_geometry, window_sink_mask)

logger = logging.getLogger(__name__)

SINKS_PARAM = "sinks"
# exp(-25) ~ 1.4e-11 of the softmax mass: outputs move by far less than 1e-6 for any score >= -10,
# yet the gradient exp(-25) * (...) is a normal float32, so the logits do train (-inf would not).
SINK_INIT = -25.0
_TAGS = {"auto": "auto", "triton": "triton", "flex": "blockmask", "sdpa": "dense", "eager": "dense_eager"}
_DENSE_BACKENDS = ("sdpa", "eager")


def layer_window(native: int | None, window: int | None, sink_tokens: int) -> tuple[int | None, int]:
    """(window, sinks) of a layer whose native window is ``native`` (None: full attention) under a patched
    ``window``: the patch only narrows. A layer whose native window is no wider than the patched one stays
    exactly native (its window, no sinks)."""
    if window is None or (native is not None and native <= window):
        return native, 0
    return window, sink_tokens


class UnsupportedAttentionArgument(ValueError):
    """The model passed the attention function an argument it cannot honour."""


# Arguments every decoder passes through to its attention function; they do not change the result.
_PASSED_THROUGH = {"output_attentions", "output_hidden_states", "output_router_logits", "num_items_in_batch", "labels",
                   "use_cache", "cache", "past_key_values", "cache_position", "max_length_q", "max_length_k",
                   "seq_idx", "return_dict"}


def _check_arguments(kwargs: dict, position_ids, is_causal) -> None:
    """Raise for any argument that would change the attention and is not honoured here."""
    if is_causal is False:
        raise UnsupportedAttentionArgument("is_causal=False: hf_longctx attention is causal only")
    if position_ids is None and any(kwargs.get(k) is not None for k in ("cu_seq_lens_q", "cu_seq_lens_k")):
        raise UnsupportedAttentionArgument("cu_seq_lens_q/k without position_ids: packed documents are read from "
                                           "position_ids")
    unknown = sorted(k for k, v in kwargs.items()
                     if v is not None and k not in _PASSED_THROUGH and not k.startswith("cu_seq_lens"))
    if unknown:
        raise UnsupportedAttentionArgument(f"the attention function does not honour {', '.join(unknown)}")


@lru_cache(maxsize=None)
def attention_implementation(backend: str, sliding_window: int | None, sink_tokens: int) -> str:
    """Register (once per setting) the attention + mask function pair and return its name.

    The names avoid "sdpa", "flash" and "flex_attention": transformers runs availability
    checks for implementations whose names contain them.
    """
    name = f"hf_longctx_attn_{_TAGS[backend]}_w{sliding_window or 0}_s{sink_tokens}"
    own_window = sliding_window  # the patched window (attention_forward's own argument is the layer's native one)

    def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                      mask_function=causal_mask_function, attention_mask=None, local_size=None, device="cpu",
                      use_vmap=False, **kwargs):
        """AttentionMaskInterface: a KernelGeometry (the kernels' geometry is exact) or bool ``[B, 1, N, M]``.

        ``local_size`` is the native window of the layers this mask is for (transformers passes it for
        its sliding-window masks, whose ``mask_function`` already holds that window).
        """
        window, sinks = layer_window(local_size, sliding_window, sink_tokens)
        if backend not in _DENSE_BACKENDS and structured_geometry(q_length, kv_length, q_offset, kv_offset,
                                                                  attention_mask):
            return KernelGeometry(local_size)
        mask = partial(sdpa_mask, batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                       kv_offset=kv_offset, attention_mask=attention_mask, allow_is_causal_skip=False,
                       use_vmap=use_vmap, device=device)
        base = mask(mask_function=mask_function)  # transformers' own mask for these layers, native window included
        if window == local_size or sinks == 0:
            return window_sink_mask(base, window, 0)
        if local_size is not None:  # sinks on a narrowed native window: they lie outside the native window
            if kv_offset != 0:
                raise ValueError(f"the KV cache dropped the first {kv_offset} tokens of a layer whose sink tokens "
                                 "must stay: call generate() or the model without a cache (hf_longctx gives one) "
                                 "or use the 'streaming' section")
            causal = mask(mask_function=causal_mask_function)
            if not torch.equal(window_sink_mask(causal, local_size, 0), base):
                raise ValueError("attention sinks on a narrowed native window need a plain causal mask; this "
                                 "input adds more (packed documents?): use the auto, triton or flex backend")
            base = causal
        return window_sink_mask(base, window, sinks)

    def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                          softcap=None, s_aux=None, position_ids=None, is_causal=None, **kwargs):
        """AttentionInterface: q ``[B, Hq, N, D]``, k/v ``[B, Hkv, M, D]`` -> ``([B, N, Hq, D], weights)``.

        Honours the family's per-layer arguments: ``softcap`` (Gemma 2 attention logit softcap), ``s_aux``
        (gpt-oss sink logits), ``scaling`` and ``dropout``; the layer's native window comes with its mask
        and is narrowed by the patched one. Raises for any other argument that would change the result.
        """
        _check_arguments(kwargs, position_ids, is_causal)
        # The layer's native window is the one its mask was built with (what transformers' sdpa and eager do);
        # a family's sliding_window argument alone (read by flash-attention only, e.g. Moshi) is not.
        native = None
        if isinstance(attention_mask, KernelGeometry):
            native, attention_mask = attention_mask.local_size, None
        window, sinks = layer_window(native, own_window, sink_tokens)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        slopes = module_alibi_slopes(module)
        sink_logits = s_aux if s_aux is not None else getattr(module, SINKS_PARAM, None)
        q_len, kv_len = query.shape[2], key.shape[2]
        dropout = dropout if module.training else 0.0
        documents = None
        if attention_mask is None:
            documents = packed_documents(position_ids, query.shape[0], q_len, kv_len)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        flex = backend == "flex" and (query.is_cuda or not needs_grad)  # flex has no backward on the CPU
        if backend in _DENSE_BACKENDS or attention_mask is not None or dropout > 0:  # the kernels: no mask, no dropout
            if attention_mask is None:
                attention_mask = window_sink_mask(causal_mask(q_len, kv_len, query.device, documents), window, sinks)
            return dense_attention(query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                   alibi_slopes=slopes, sink_logits=sink_logits, softcap=softcap,
                                   use_sdpa=backend != "eager")
        run = flex_path if flex else partial(kernel_path, backend="triton" if backend == "triton" else "auto")
        options = dict(scaling=scaling, window=window, sink_tokens=sinks, alibi_slopes=slopes,
                       sink_logits=sink_logits, softcap=softcap)
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


_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def native_windows(model: nn.Module) -> list[int | None]:
    """Each layer's native sliding window (None: full attention), from the config as transformers reads it."""
    config = model.config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def attention_cache(model: nn.Module, section: AttentionSpec) -> Cache:
    """A KV cache whose layers keep what the patched layers attend to.

    A layer with a window and no sinks keeps its last ``window - 1`` tokens (transformers'
    ``DynamicSlidingWindowLayer``); a layer with sinks keeps every token, so that the sinks stay at
    their true positions; a full-attention layer keeps every token. ``is_sliding`` follows the
    layer's native type, so that transformers builds each mask from a layer of that type.
    """
    layers = []
    for native in native_windows(model):
        window, sinks = layer_window(native, section.sliding_window, section.sink_tokens)
        layer = DynamicSlidingWindowLayer(window) if window is not None and not sinks else DynamicLayer()
        layer.is_sliding = native is not None
        layers.append(layer)
    return Cache(layers=layers)


def _check(model: nn.Module, section: AttentionSpec, spec) -> None:
    layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None) or ()
    if "chunked_attention" in layer_types:  # Llama 4: its mask keeps each query inside its chunk of the input
        raise SpecError(f"'attention' is not supported for model_type '{model.config.model_type}': its layers of "
                        "type chunked_attention attend within fixed chunks of the input, which the patched "
                        "attention's causal or sliding mask does not reproduce")
    if section.learnable_sinks:
        for attn in get_family(model).attention_modules(model):
            if hasattr(attn, SINKS_PARAM):
                raise SpecError(f"{type(attn).__name__} already has a '{SINKS_PARAM}' attribute; "
                                "'attention.learnable_sinks' cannot add its own")


_PROBE_TOKENS = 8


@torch.no_grad()
def _probe_logits(model: nn.Module) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        ids = torch.arange(3, 3 + _PROBE_TOKENS, device=model.device)[None]
        return model(ids, use_cache=False).logits.float()
    finally:
        model.train(was_training)


def _probe(model: nn.Module, reference: torch.Tensor, backend: str) -> None:
    """Refuse (SpecError) a model whose attention passes an argument the function cannot honour, or does
    not take its mask as given (Doge builds its own from it): with no window of its own, the function
    must reproduce the model's previous attention on a few tokens."""
    name = model.config._attn_implementation
    model.set_attn_implementation(attention_implementation(backend, None, 0))
    try:
        logits = _probe_logits(model)
    except UnsupportedAttentionArgument as err:
        raise SpecError(f"'attention' is not supported for model_type '{model.config.model_type}': {err}") from err
    except Exception as err:  # noqa: BLE001  the family's attention cannot run through the function (HY-V4 indexes the mask)
        raise SpecError(f"'attention' is not supported for model_type '{model.config.model_type}': its attention "
                        f"fails through hf_longctx's function ({type(err).__name__}: {err})") from err
    finally:
        model.set_attn_implementation(name)
    tolerance = 1e-4 if model.dtype in (torch.float32, torch.float64) else 3e-2
    error = ((logits - reference).abs().max() / reference.abs().max().clamp(min=1e-6)).item()
    if not error <= tolerance:
        raise SpecError(f"'attention' is not supported for model_type '{model.config.model_type}': its attention "
                        f"does not give the same result through hf_longctx's function (relative difference "
                        f"{error:.2g}); it may build its own mask")


def _apply(model: nn.Module, section: AttentionSpec, spec) -> Applied:
    family = get_family(model)
    previous_impl = model.config._attn_implementation
    logits_before = _probe_logits(model)
    name = attention_implementation(section.backend, section.sliding_window, section.sink_tokens)
    modules = family.attention_modules(model)
    if section.learnable_sinks:
        for attn in modules:
            reference = next(attn.parameters())
            sinks = torch.full((model.config.get_text_config(decoder=True).num_attention_heads,), SINK_INIT, dtype=reference.dtype,
                               device=reference.device)
            attn.register_parameter(SINKS_PARAM, nn.Parameter(sinks))
    model.set_attn_implementation(name)
    logger.info("attention: %s (previous implementation %s)", name, previous_impl)

    def undo():
        model.set_attn_implementation(previous_impl)
        if section.learnable_sinks:
            for attn in modules:
                delattr(attn, SINKS_PARAM)

    try:
        _probe(model, logits_before, section.backend)
    except BaseException:
        undo()
        raise
    text_config = model.config.get_text_config(decoder=True)
    layer_types = set(getattr(text_config, "layer_types", None) or _ATTENTION_LAYER_TYPES)
    if (section.sliding_window is None or not layer_types <= set(_ATTENTION_LAYER_TYPES)
            or not model._supports_default_dynamic_cache()):
        return Applied(undo=undo)  # the model's own cache (recurrent or linear-attention layers): keeps every token

    def wrap_forward(inner):
        @functools.wraps(inner)
        def forward(*args, **kwargs):
            use_cache = kwargs.get("use_cache")
            if compat.passed_cache(kwargs) is None and (text_config.use_cache if use_cache is None else use_cache):
                kwargs[compat.CACHE] = attention_cache(model, section)
            return inner(*args, **kwargs)

        return forward

    def wrap_generate(inner):
        @functools.wraps(inner)
        def generate(*args, **kwargs):
            if compat.passed_cache(kwargs) is None and kwargs.get("use_cache", True) is not False:
                kwargs[compat.CACHE] = attention_cache(model, section)
            return inner(*args, **kwargs)

        return generate

    return Applied(undo=undo, wraps=(Wrap(model, "forward", wrap_forward), Wrap(model, "generate", wrap_generate)))


def _native_config(model: nn.Module, params: dict) -> dict | None:
    """A plain sliding window is native for families whose config can hold one (Mistral, Qwen, Phi-3, Gemma 2)
    when every layer ends up with the same window."""
    section = AttentionSpec.from_dict(params)
    if section.sliding_window is None or section.sink_tokens or section.learnable_sinks:
        return None
    windows = {layer_window(native, section.sliding_window, 0)[0] for native in native_windows(model)}
    if len(windows) != 1:
        return None  # hybrid layers keep different windows: one config value cannot say so
    return get_family(model).sliding_window_config(model.config, windows.pop())


register_technique(
    Technique(section="attention", spec_class=AttentionSpec, apply=_apply, check=_check, order=20,
              native_config=_native_config)
)
