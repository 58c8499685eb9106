"""Perplexity and bits per byte against context length, with the sliding evaluation of YaRN.

The text is one token stream. Windows end at ``num_windows`` positions spread evenly over the
stream, and every context length scores the same final ``score_tokens`` tokens of each window:
at length ``L`` the model reads the ``L`` tokens that end there and only the predictions of the
last ``score_tokens`` tokens count. Longer contexts therefore see more of the past before the
very same targets, and a curve that rises with ``L`` means the model gets worse when it reads
further back (the positions beyond its trained length hurt), not that the targets changed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass
class PerplexityPoint:
    """The score of one context length (mean over all scored tokens of all windows)."""

    length: int  # context length in tokens
    nll: float  # mean negative log-likelihood, nats per token
    perplexity: float  # exp(nll)
    bits_per_token: float  # nll / ln 2
    bits_per_byte: float | None  # total bits / total UTF-8 bytes of the scored tokens; None without a byte count
    windows: int
    scored_tokens: int  # per window

    def to_dict(self) -> dict:
        return asdict(self)


def window_ends(num_tokens: int, max_length: int, num_windows: int) -> list[int]:
    """``num_windows`` exclusive end positions, evenly spread over ``[max_length, num_tokens]``.

    Every end leaves room for a window of ``max_length`` tokens before it. Raises ``ValueError``
    when the stream is shorter than ``max_length`` or cannot hold ``num_windows`` distinct ends.
    """
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1, got {num_windows}")
    if num_tokens < max_length:
        raise ValueError(
            f"the evaluation text has {num_tokens} tokens; a context length of {max_length} needs at least that many"
        )
    span = num_tokens - max_length
    if num_windows > span + 1:
        raise ValueError(
            f"the evaluation text has {num_tokens} tokens: room for at most {span + 1} distinct windows of "
            f"{max_length} tokens, {num_windows} were asked for"
        )
    if num_windows == 1:
        return [num_tokens]
    return [max_length + (span * i) // (num_windows - 1) for i in range(num_windows)]


def score_last_tokens(model: nn.Module, input_ids: torch.Tensor, score_tokens: int) -> torch.Tensor:
    """Negative log-likelihood (nats) of the last ``score_tokens`` tokens of each row.

    ``input_ids``: ``[B, L]`` with ``score_tokens < L``. Returns ``[B, score_tokens]``: entry
    ``[b, j]`` is ``-log p(x[b, L - score_tokens + j] | x[b, :L - score_tokens + j])``. Only the
    logits that are needed are computed (``logits_to_keep``), which matters for large
    vocabularies at long lengths.
    """
    length = input_ids.shape[1]
    if not 0 < score_tokens < length:
        raise ValueError(f"score_tokens must be in [1, {length - 1}] for windows of {length} tokens, got {score_tokens}")
    logits = model(input_ids=input_ids, logits_to_keep=score_tokens + 1).logits[:, :-1].float()
    targets = input_ids[:, -score_tokens:]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


@torch.inference_mode()
def perplexity_vs_length(
    model: nn.Module,
    tokens: torch.Tensor | Sequence[int],
    lengths: Sequence[int],
    *,
    num_windows: int = 32,
    score_tokens: int | None = None,
    batch_size: int = 8,
    token_bytes: Callable[[list[int]], int] | None = None,
    desc: str = "perplexity",
) -> list[PerplexityPoint]:
    """Sliding evaluation of ``model`` on ``tokens`` (1-D) at each context length.

    Args:
        tokens: the evaluation text as one 1-D stream of token ids, at least ``max(lengths)`` long.
        lengths: context lengths in tokens; each scores the same final tokens of the same windows.
        num_windows: windows per length (their ends are :func:`window_ends`).
        score_tokens: tokens scored at the end of every window; default ``min(lengths) - 1``, the
            most that the shortest length can score.
        token_bytes: the number of UTF-8 bytes that a list of token ids decodes to; with it the
            points carry bits per byte (for a byte-level model, ``len``).
    Returns:
        one :class:`PerplexityPoint` per length, in the order given.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 2:
        raise ValueError(f"context lengths must be >= 2 tokens, got {lengths}")
    score_tokens = min(lengths) - 1 if score_tokens is None else int(score_tokens)
    if not 0 < score_tokens < min(lengths):
        raise ValueError(f"score_tokens must be in [1, {min(lengths) - 1}] (below the shortest length), got {score_tokens}")
    ends = window_ends(len(tokens), max(lengths), num_windows)
    total_bytes = None
    if token_bytes is not None:
        total_bytes = sum(token_bytes(tokens[end - score_tokens : end].tolist()) for end in ends)
    device = next(model.parameters()).device
    points = []
    batches = [ends[i : i + batch_size] for i in range(0, len(ends), batch_size)]
    with tqdm(total=len(lengths) * len(ends), desc=desc, unit="window", leave=False) as bar:
        for length in lengths:
            total_nll = 0.0
            for batch_ends in batches:
                input_ids = torch.stack([tokens[end - length : end] for end in batch_ends]).to(device)
                total_nll += score_last_tokens(model, input_ids, score_tokens).double().sum().item()
                bar.update(len(batch_ends))
            count = len(ends) * score_tokens
            nll = total_nll / count
            points.append(
                PerplexityPoint(
                    length=length,
                    nll=nll,
                    perplexity=math.exp(nll),
                    bits_per_token=nll / math.log(2),
                    bits_per_byte=None if total_bytes is None else total_nll / math.log(2) / total_bytes,
                    windows=len(ends),
                    scored_tokens=score_tokens,
                )
            )
            logger.info("%s: length %d, %.4f nats/token", desc, length, nll)
    return points
