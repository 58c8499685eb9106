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
from transformers.cache_utils import Cache

from .. import compat
from ..streaming.cache import SinkCache
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
    the others are NaN in ``token_nll`` and left out of the means.
    """
    model.eval()
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1).to(model.device)
    total = ids.shape[1] - 1
    if total < 1:
        raise ValueError(f"the stream needs at least 2 tokens, got {ids.shape[1]}")
    if score_every < 1 or (score_every > 1 and not recompute):
        raise ValueError(f"score_every must be 1, or >= 1 with recompute=True (a cache sees every token), got {score_every}")
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
        size = min(chunk, total - start)
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
