"""The ``streaming`` patch: ``generate`` streams with a SinkCache, long inputs go in chunks.

Applying the section contributes two wrappers to the model's call path (installed and
removed by the patching core):

* ``generate``: when no cache is given (and ``use_cache`` is not False), it passes a fresh
  ``SinkCache(sink_tokens, window)``.
* ``forward``: when the cache is a :class:`SinkCache`, the cache is bound to the model in the
  ``"cache"`` position frame (positions are cache slots, never above ``S + W - 1``, the
  ``position_ids`` given are ignored) and the input is fed by :func:`streaming_forward`.
  Other caches go to the original ``forward`` untouched.

Long inputs (prefill): :func:`streaming_forward` first feeds as many tokens as fill the cache
to ``S + W`` in one pass (no eviction: exactly the dense model), then the rest in chunks of
``prefill_chunk`` tokens. Token ``j`` of a chunk of ``c`` tokens attends to the sinks, the
last ``W - c`` cached tokens and the chunk's tokens up to itself: the sinks are always in
view, at most ``S + W`` keys are attended, and ``prefill_chunk = 1`` is exactly StreamingLLM's
one token at a time. No mask beyond the plain causal one is needed.

Native windows (Mistral, and the local layers of hybrid models: Gemma 2/3, gpt-oss, Qwen with
``max_window_layers``): a layer whose native sliding window is no wider than ``S + W`` keeps it,
without sinks, in a cache of its own window (the model's own sliding mask applies); the other
layers keep the sinks and the recent window. Every layer's keys end right before the new tokens,
so local layers see their true distances. Llama 4's chunked layers keep their chunk the same way.

Hybrid models: the recurrent layers (linear attention, Mamba, convolutions) keep transformers' own
state, which every token enters (:mod:`.structure`). Where they do not continue that state over
several tokens as in one pass (checked once on the model's own cache), the chunks after the first
pass are single tokens.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from .. import compat
from ..config_base import SpecError
from ..families import get_family
from ..patching import Applied, Technique, Wrap, register_technique
from .cache import SinkCache
from .structure import continues_in_chunks
from .config import StreamingSpec

logger = logging.getLogger(__name__)



def default_prefill_chunk(window: int) -> int:
    """Chunk length for prompts longer than the cache: an eighth of the window (at least 1 token)."""
    return max(1, window // 8)


def _left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """Leading zeros per row of a 2D mask ``[B, L]`` -> ``[B]``."""
    return (attention_mask.long().cumsum(-1) == 0).sum(-1)


def streaming_forward(
    model: nn.Module,
    forward,
    cache: SinkCache,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    logits_to_keep: int = 0,
    prefill_chunk: int | None = None,
    **kwargs: Any,
):
    """Run ``forward`` (a causal LM forward) over new tokens with a SinkCache in the cache frame.

    input_ids ``[B, L]`` (or inputs_embeds ``[B, L, H]``); attention_mask ``[B, seen + L]`` covering
    every token seen so far (a mask of the new tokens only is taken as such, with the past all
    real). Returns the model output of the last chunk with ``logits`` ``[B, L, V]`` of all chunks
    (the last ``logits_to_keep`` when > 0) and ``loss`` from ``labels`` ``[B, L]``.
    """
    cache.bind(model, position_frame="cache")
    inputs = input_ids if input_ids is not None else inputs_embeds
    batch, length = inputs.shape[:2]
    seen = cache.get_seq_length()
    if attention_mask is not None:
        if attention_mask.shape[-1] == length and seen > 0:
            attention_mask = torch.cat([attention_mask.new_ones(batch, seen), attention_mask], dim=-1)
        if seen == 0 and not bool(attention_mask.all()):
            cache.set_left_padding(_left_padding(attention_mask))
    capacity = cache.num_sink_tokens + cache.window_length
    chunk = prefill_chunk or default_prefill_chunk(cache.window_length)
    room = capacity - max(cache.cached_lengths(), default=0)  # tokens that fit without any eviction
    first = min(length, room if room > 0 else chunk)
    if not continues_in_chunks(model):  # recurrent layers that continue a state only token by token
        chunk, first = 1, first if seen == 0 else 1
    sizes = [first] + [min(chunk, length - start) for start in range(first, length, chunk)]
    keep_last_only = isinstance(logits_to_keep, int) and 0 < logits_to_keep <= sizes[-1]
    logits, start, out = [], 0, None
    for index, size in enumerate(sizes):
        last = index == len(sizes) - 1
        position_ids = torch.arange(size, device=inputs.device) + cache.kept_length(size)
        step_inputs = {"input_ids" if input_ids is not None else "inputs_embeds": inputs[:, start : start + size]}
        out = forward(
            **step_inputs,
            attention_mask=None if attention_mask is None else attention_mask[:, : seen + start + size],
            position_ids=position_ids.expand(batch, size),
            **{compat.CACHE: cache},
            logits_to_keep=(logits_to_keep if last else 1) if keep_last_only else 0,
            **kwargs,
        )
        if last or not keep_last_only:
            logits.append(out.logits)
        start += size
    out.logits = torch.cat(logits, dim=1)
    if isinstance(logits_to_keep, int) and logits_to_keep > 0 and not keep_last_only:
        out.logits = out.logits[:, -logits_to_keep:]
    if labels is not None:
        out.loss = model.loss_function(logits=out.logits, labels=labels, vocab_size=model.config.vocab_size)
    return out


@torch.no_grad()
def _probe(model: nn.Module, section: StreamingSpec) -> None:
    """A short generate through the section's SinkCache: a model whose layers need a cache of another kind
    (LFM2's convolutions where its config does not list them) is refused here, not in generate."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.full((1, 2), 3, dtype=torch.long, device=model.device)  # a prefill, then decoding steps
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                       do_sample=False, pad_token_id=0,
                       **{compat.CACHE: SinkCache(section.sink_tokens, section.window, model=model)})
    except Exception as err:  # noqa: BLE001  the model itself rejects the cache
        raise SpecError(f"'streaming' is not supported for model_type '{model.config.model_type}': it does not run "
                        f"with a sink cache ({type(err).__name__}: {err})") from err
    finally:
        model.train(was_training)


def _check(model: nn.Module, section: StreamingSpec, spec) -> None:
    name = model.config.model_type
    if not hasattr(model, "generate"):
        raise SpecError(f"'streaming' needs a causal LM with generate(); got {type(model).__name__}")
    if not model._supports_default_dynamic_cache():
        raise SpecError(f"'streaming' is not supported for model_type '{name}': it keeps a cache of its own")
    config = model.config.get_text_config(decoder=True)
    rotary = get_family(model).rotary_embedding(model)
    layer_types = set(getattr(config, "layer_types", None) or ())
    if rotary is not None and not hasattr(rotary, "inv_freq") and not (
            layer_types and all(hasattr(rotary, f"{kind}_inv_freq") for kind in layer_types)):
        raise SpecError(f"'streaming' is not supported for model_type '{name}': its rotary embedding "
                        f"({type(rotary).__name__}) has no inv_freq to re-rotate the cached keys with")
    chunk = getattr(config, "attention_chunk_size", None)
    if "chunked_attention" in (getattr(config, "layer_types", None) or ()) and chunk is not None and (
            chunk > section.sink_tokens + section.window):
        raise SpecError(f"'streaming' is not supported for model_type '{name}' with {section.sink_tokens} sinks + "
                        f"a window of {section.window}: its chunked_attention layers attend within chunks of "
                        f"{chunk} tokens, and a chunk mask over fewer cached tokens would take the sinks for "
                        f"tokens of the current chunk; a window of at least {chunk - section.sink_tokens} keeps "
                        "those layers exact (their own chunk, no sinks)")
    try:
        cache = SinkCache(section.sink_tokens, section.window, model=model)
    except ValueError as err:  # cache layers it can neither replace nor keep, keys it cannot move exactly
        raise SpecError(f"'streaming' is not supported for model_type '{name}': {err}") from err
    if not continues_in_chunks(model):
        logger.info("streaming: the recurrent layers of model_type '%s' do not continue their state over several "
                    "tokens as in one pass; inputs that overflow the cache go one token at a time", name)
    _probe(model, section)
    own_window = getattr(config, "sliding_window", None)
    if own_window is not None and own_window <= section.sink_tokens + section.window:
        logger.info("streaming: layers with the native window %d keep it (no sinks); the others keep %d sinks + "
                    "%d recent tokens", own_window, section.sink_tokens, section.window)


def _apply(model: nn.Module, section: StreamingSpec, spec) -> Applied:
    def wrap_forward(inner):
        @functools.wraps(inner)
        def forward(*args, **kwargs):
            cache = compat.passed_cache(kwargs)
            if not isinstance(cache, SinkCache):
                return inner(*args, **kwargs)
            for key in (*compat.CACHE_KEYWORDS, "position_ids"):
                kwargs.pop(key, None)
            if args:
                kwargs["input_ids"] = args[0]
            return streaming_forward(model, inner, cache, prefill_chunk=section.prefill_chunk, **kwargs)

        return forward

    def wrap_generate(inner):
        @functools.wraps(inner)
        def generate(*args, **kwargs):
            if compat.passed_cache(kwargs) is None and kwargs.get("use_cache", True) is not False:
                kwargs[compat.CACHE] = SinkCache(section.sink_tokens, section.window, model=model)
            return inner(*args, **kwargs)

        return generate

    return Applied(wraps=(Wrap(model, "forward", wrap_forward), Wrap(model, "generate", wrap_generate)))


def _card(params: dict, model=None) -> list[str]:
    return ["- **Input length:** unbounded stream; the KV cache keeps the attention sinks and a recent window"]


register_technique(
    Technique(section="streaming", spec_class=StreamingSpec, apply=_apply, check=_check, order=50, card=_card)
)
