"""Streaming perplexity: the StreamingLLM / attention_sinks protocol over one long token stream.

The stream is fed in order, ``chunk`` tokens at a time (1 by default, as in the papers), into
one cache that is never reset; every token but the first is predicted once, from what the cache
holds at that moment. At each checkpoint the cumulative perplexity, the cache size, the memory
and the mean time per token since the previous checkpoint are recorded, so a curve shows whether
quality holds and memory and time stay flat far beyond the window.

Baselines use the same loop: ``cache=DynamicCache()`` is the dense model (all tokens kept,
absolute positions), ``SinkCache(0, W)`` is a window without sinks, and ``recompute=True`` is
the sliding window with re-computation of StreamingLLM: each token re-reads its sinks and last
``window`` tokens from scratch, with no cache.

:func:`streaming_nll` gives the same per-token losses as the one-token-per-step loop with a
SinkCache, from one forward pass over the stream. A streamed token's keys and values never
change once computed, so every token can be computed at once, layer by layer, if each query
sees exactly what the cache would show it: the sinks and the last ``W`` tokens (itself
included), at the cache's positions. Only distances matter to RoPE: a window key sits at its
true distance ``j - k``; a sink ``i`` sits at ``min(j, S + W - 1) - i``, so its score uses the
query rotated back by ``max(0, j - S - W + 1)`` positions. The loop costs one forward of the
whole model per token; this costs about one forward of the stream.
"""

from __future__ import annotations

import logging
import math
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from .. import compat
from ..families import get_family
from ..positions import module_alibi_slopes
from ..positions.rope import length_dependent, rope_types
from ..streaming.cache import SinkCache, rotate_keys
from ..streaming.patch import streaming_forward

logger = logging.getLogger(__name__)


@dataclass
class StreamingPoint:
    """The state of the stream after ``tokens`` predictions."""

    tokens: int  # predictions passed so far (tokens streamed - 1)
    nll: float  # mean negative log-likelihood over the predictions scored so far, nats per token
    perplexity: float  # exp(nll)
    cache_tokens: int  # tokens held by the cache (first layer); the kept context for recompute
    cache_bytes: int  # bytes of cached keys and values, all layers
    peak_memory_bytes: int  # since the stream started; CUDA: max allocated; CPU: peak resident set (see _peak_memory)
    ms_per_token: float  # mean wall time per scored token since the previous checkpoint


@dataclass
class StreamingResult:
    sink_tokens: int
    window: int
    method: str  # "sinks", "dense", "recompute", or the cache class name
    points: list[StreamingPoint] = field(default_factory=list)
    start_memory_bytes: int = 0  # in use when the stream started (the model, mostly): peak - start is what streaming added
    seconds: float = 0.0  # wall time of the whole stream
    token_nll: list[float] = field(default_factory=list)  # per prediction, nats; NaN where not scored

    def to_dict(self) -> dict:
        return asdict(self)


def _reset_peak_memory(device: torch.device) -> int:
    """Restart the peak-memory measurement; returns the bytes in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident set restarts from the current one
    except OSError:
        logger.debug("cannot reset the peak resident set here; peaks count from the process start")
    return _resident_bytes("VmRSS")


def _resident_bytes(field_name: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc; ``ru_maxrss`` where there is no /proc."""
    status = Path("/proc/self/status")
    if status.is_file():
        match = re.search(rf"^{field_name}:\s+(\d+) kB", status.read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux and BSD report KiB


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _resident_bytes("VmHWM")


def _cache_size(cache: Cache) -> tuple[int, int]:
    if not cache.layers or not cache.layers[0].is_initialized:
        return 0, 0
    tokens = cache.layers[0].keys.shape[-2]
    size = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.is_initialized)
    return tokens, size


def kept_indices(t: int, sink_tokens: int, window: int) -> list[int]:
    """StreamingLLM: the token indices a step at token ``t`` sees, the first ``sink_tokens`` and the
    last ``window`` tokens up to ``t`` included."""
    return sorted(set(range(min(sink_tokens, t + 1))) | set(range(max(0, t + 1 - window), t + 1)))


@torch.no_grad()
def streaming_perplexity(
    model: nn.Module,
    token_ids: torch.Tensor | Sequence[int],
    sink_tokens: int = 4,
    window: int = 1020,
    *,
    chunk: int = 1,
    checkpoints: Sequence[int] | None = None,
    num_checkpoints: int = 8,
    cache: Cache | None = None,
    recompute: bool = False,
    score_every: int = 1,
    warmup: int = 0,
    warmup_chunk: int = 64,
    progress: bool = True,
) -> StreamingResult:
    """Stream ``token_ids`` (``[N]`` or ``[1, N]``) through ``model`` and score every next token.

    ``sink_tokens``/``window``: S and W of the SinkCache (or of the recomputed context).
    ``checkpoints``: prediction counts at which to record a point (default ``num_checkpoints``
    evenly spaced up to ``N - 1``). ``cache``: stream into this cache instead of a fresh
    ``SinkCache(sink_tokens, window)`` (e.g. ``DynamicCache()`` for the dense baseline).
    A SinkCache streams in the cache position frame (positions never exceed ``S + W - 1``), the
    model patched for streaming or not. ``score_every`` (recompute only, whose every prediction
    is a forward over up to ``S + W`` tokens): score predictions ``k - 1, 2k - 1, ...`` only;
    the others are NaN in ``token_nll`` and left out of the means. ``warmup``: feed the first ``warmup``
    tokens ``warmup_chunk`` at a time (scored like the rest; the time per token of the first checkpoint at or
    after it includes them): for a cache that keeps every token (``DynamicCache``) chunks change nothing but the
    speed, so the steps of interest (the last ones, with the longest context) are reached quickly. A SinkCache
    takes of a warmup chunk what fits without evicting (which sees what single steps see) and the rest in steps
    of ``chunk`` tokens, so warming it up to its capacity ``S + W`` changes nothing but the speed either.
    """
    model.eval()
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1).to(model.device)
    total = ids.shape[1] - 1
    if total < 1:
        raise ValueError(f"the stream needs at least 2 tokens, got {ids.shape[1]}")
    if score_every < 1 or (score_every > 1 and not recompute):
        raise ValueError(f"score_every must be 1, or >= 1 with recompute=True (a cache sees every token), got {score_every}")
    if warmup and recompute:
        raise ValueError("warmup needs a cache: recompute has none")
    if checkpoints is None:
        checkpoints = sorted({max(1, round(total * (i + 1) / num_checkpoints)) for i in range(num_checkpoints)})
    bad = [c for c in checkpoints if not score_every <= c <= total]
    if bad:
        raise ValueError(f"checkpoints must lie in {score_every}..{total} (predictions in the stream), got {bad}")
    if recompute:
        cache, method = None, "recompute"
    else:
        cache = cache if cache is not None else SinkCache(sink_tokens, window, model=model)
        method = "sinks" if isinstance(cache, SinkCache) else type(cache).__name__
    forward = type(model).forward.__get__(model)  # the class forward, under any streaming patch
    result = StreamingResult(sink_tokens=sink_tokens, window=window, method=method)
    result.start_memory_bytes = _reset_peak_memory(ids.device)
    nll = torch.full((total,), math.nan, dtype=torch.float64)
    pending = sorted(checkpoints)
    began = last_time = time.perf_counter()
    scored_since = 0
    bar = tqdm(total=total, desc=f"streaming ppl ({method})", disable=not progress, unit="tok")
    start = score_every - 1  # the first prediction to score
    while start < total:
        size = min(warmup_chunk, warmup - start) if start < warmup else min(chunk, total - start)
        if recompute:
            context = kept_indices(start, sink_tokens, window)
            logits = model(ids[:, context], logits_to_keep=1).logits.float()
        elif isinstance(cache, SinkCache):
            step = streaming_forward(model, forward, cache, input_ids=ids[:, start : start + size], prefill_chunk=chunk)
            logits = step.logits.float()
        else:
            logits = model(ids[:, start : start + size], **{compat.CACHE: cache}, use_cache=True).logits.float()
        size = logits.shape[1]
        targets = ids[0, start + 1 : start + 1 + size]
        nll[start : start + size] = torch.nn.functional.cross_entropy(logits[0], targets, reduction="none").double().cpu()
        start += score_every if recompute else size
        done = min(start, total)  # predictions passed: scored, or skipped by score_every
        scored_since += size
        bar.update(done - bar.n)
        while pending and pending[0] <= done:
            count = pending.pop(0)
            now = time.perf_counter()
            mean = nll[:count].nanmean().item()
            cache_tokens, cache_bytes = _cache_size(cache) if cache is not None else (len(context), 0)
            result.points.append(
                StreamingPoint(
                    tokens=count,
                    nll=mean,
                    perplexity=math.exp(mean),
                    cache_tokens=cache_tokens,
                    cache_bytes=cache_bytes,
                    peak_memory_bytes=_peak_memory(ids.device),
                    ms_per_token=1000 * (now - last_time) / max(scored_since, 1),
                )
            )
            last_time, scored_since = now, 0
    bar.close()
    result.seconds = time.perf_counter() - began
    result.token_nll = nll.tolist()
    logger.info("streaming perplexity (%s, S=%d, W=%d): %.3f", method, sink_tokens, window, result.points[-1].perplexity)
    return result


def parallel_streaming_check(model: nn.Module) -> None:
    """Raise ``ValueError`` saying why :func:`streaming_nll` cannot reproduce the stream of ``model``.

    Supported: one rotary embedding of the ``position * inv_freq`` kind (not dynamic NTK or LongRoPE), full
    attention in every layer (no native sliding window, no softcap or sink logits: the attention function
    raises for those at run time), no hf_longctx attention or ALiBi patch.
    """
    kind = model.config.model_type
    if str(model.config._attn_implementation).startswith("hf_longctx") or any(
        module_alibi_slopes(m) is not None for m in model.modules()
    ):
        raise ValueError(f"{kind}: the attention is patched (attention or alibi section); stream it with "
                         "streaming_perplexity instead")
    family = get_family(model)
    rotaries = family.rotary_embeddings(model)
    if len(rotaries) != 1 or not hasattr(next(iter(rotaries.values())), "inv_freq"):
        raise ValueError(f"{kind}: streaming_nll needs one rotary embedding with inv_freq, found {len(rotaries)}")
    # the one pass reaches position N - 1 where the stream never goes past S + W - 1: length-dependent frequencies
    # would differ; a native window stays the layer's own in a SinkCache
    obstacle = length_or_window_obstacle(model)
    if obstacle:
        raise ValueError(f"{kind}: {obstacle}; stream it with streaming_perplexity instead")


def length_or_window_obstacle(model: nn.Module) -> str | None:
    """What keeps a model's keys from being reused across lengths or caches, or None.

    A RoPE whose frequencies follow the sequence length (dynamic NTK, LongRoPE) gives a token other keys in a
    longer or shorter pass; native sliding-window layers keep their own window in the cache. Both
    :func:`parallel_streaming_check` and the passkey's prefix sharing refuse such models with this reason.
    """
    from ..attention.backend import native_windows  # the attention technique stays out of the evaluation's imports

    if length_dependent(model):
        types = rope_types(model.config.get_text_config(decoder=True))
        return f"rope type {sorted(types)} changes its frequencies with the length"
    windows = {w for w in native_windows(model) if w is not None}
    if windows:
        return f"layers with a native sliding window ({sorted(windows)}) keep their own window in the cache"
    return None


def _streaming_attention(rotary: nn.Module, sink_tokens: int, window: int, block: int):
    """An AttentionInterface function: every query of a ``[1, H, N, D]`` stream sees what a SinkCache shows it."""
    from ..attention.backend import _PASSED_THROUGH  # the arguments every decoder passes without effect

    neutral = _PASSED_THROUGH | {"position_ids", "is_causal"}
    capacity = sink_tokens + window

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                  softcap=None, s_aux=None, **kwargs):
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in neutral)
        given = [name for name, v in (("attention_mask", attention_mask), ("sliding_window", sliding_window),
                                      ("softcap", softcap), ("s_aux", s_aux)) if v is not None]
        if unknown or given or (module.training and dropout):
            raise ValueError(f"streaming_nll does not reproduce attention with {', '.join(given + unknown) or 'dropout'}")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        groups = query.shape[1] // key.shape[1]
        q = query.float()
        k = key.float().repeat_interleave(groups, dim=1)
        v = value.float().repeat_interleave(groups, dim=1)
        n = q.shape[2]
        positions = torch.arange(n, device=q.device)
        inv_freq = rotary.inv_freq.double()
        out = torch.empty_like(q)
        for a in range(0, n, block):
            b = min(a + block, n)
            lo = max(0, a - window + 1)
            queries, rows = q[:, :, a:b], positions[a:b, None]
            columns = positions[None, lo:b]
            scores = (queries @ k[:, :, lo:b].transpose(-1, -2) * scaling).masked_fill(
                (columns > rows) | (columns <= rows - window), -math.inf)
            keys, values = [scores], [v[:, :, lo:b]]
            sinks = min(sink_tokens, max(0, b - window))  # sinks outside the window of some query of the block
            if sinks:
                back = (positions[a:b] - (capacity - 1)).clamp(min=0)  # positions to rotate each query back by
                angles = -(back[:, None].double() * inv_freq)[None]
                sink_scores = (rotate_keys(queries, angles) @ k[:, :, :sinks].transpose(-1, -2) * scaling).masked_fill(
                    positions[None, :sinks] > rows - window, -math.inf)  # inside the window it is a window key
                keys.insert(0, sink_scores)
                values.insert(0, v[:, :, :sinks])
            weights = torch.cat(keys, dim=-1).softmax(dim=-1)
            out[:, :, a:b] = weights @ torch.cat(values, dim=-2)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


@torch.no_grad()
def streaming_nll(
    model: nn.Module, token_ids: torch.Tensor | Sequence[int], sink_tokens: int = 4, window: int = 1020, *,
    block: int = 256,
) -> torch.Tensor:
    """Per-prediction negative log-likelihood ``[N - 1]`` (nats, float64) of streaming ``token_ids`` one token at a
    time through ``SinkCache(sink_tokens, window)`` in the cache frame, as :func:`streaming_perplexity` does, from one
    forward pass (see the module docstring). ``sink_tokens=0`` is a sliding window of ``window`` tokens.

    ``block``: queries per block of the attention (memory ``~ H * block * (block + window)`` floats per layer).
    The logits of the whole stream are materialised (``N x vocabulary`` floats). Raises ``ValueError`` for a model
    it cannot reproduce (:func:`parallel_streaming_check`).
    """
    if sink_tokens < 0 or window < 1:
        raise ValueError(f"need sink_tokens >= 0 and window >= 1, got {sink_tokens} and {window}")
    parallel_streaming_check(model)
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1).to(model.device)
    if ids.shape[1] < 2:
        raise ValueError(f"the stream needs at least 2 tokens, got {ids.shape[1]}")
    rotary = get_family(model).rotary_embedding(model)
    name = f"hf_longctx_stream_eval_s{sink_tokens}_w{window}"
    AttentionInterface.register(name, _streaming_attention(rotary, sink_tokens, window, block))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, lambda *args, **kwargs: None)  # the function builds its own
    previous, was_training = model.config._attn_implementation, model.training
    forward = type(model).forward.__get__(model)  # the class forward, under any streaming patch
    model.eval()
    model.set_attn_implementation(name)
    try:
        logits = forward(input_ids=ids, use_cache=False).logits[0, :-1].float()
    finally:
        model.set_attn_implementation(previous)
        model.train(was_training)
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").double().cpu()
