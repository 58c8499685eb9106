"""The attention math behind the ``attention`` patch: explicit masks, the torch path, flex, the kernels.

Mask semantics. A query sees the keys its base mask allows (causal, left padding, packed
documents, as transformers builds it). Among those, counted in order from the first
visible key: the last ``W`` (itself included: transformers' ``sliding_window``) and the
first ``S`` (the attention sinks, StreamingLLM) stay visible. Ranking the keys that the
base mask allows, rather than their indices, makes a left-padded row or a packed document
behave exactly as the same tokens alone: pads are never counted, and sinks are the first
tokens of each sequence or document.

Three ways to compute it:

- ``dense_attention``: torch with an explicit ``[B, 1, N, M]`` mask (``sdpa``/``eager``
  backends, and every backend when the batch is padded or the keys are not exactly the
  tokens ``0..M-1``, e.g. a static cache). SDPA where it can; eager math when the
  learnable sink logits join the softmax (SDPA has no such input) or when asked for.
- ``flex_path``: ``flex_attention`` with a ``BlockMask`` built from the geometry.
- ``kernel_path``: ``hf_longctx.kernels.flash_attention`` (Triton on CUDA, the blocked
  O(N·W) torch path on the CPU), which has no padding mask: it gets the unpadded cases.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.masking_utils import find_packed_sequence_indices

from ..positions.alibi import _repeat_kv, alibi_bias


def structured_geometry(q_length, kv_length, q_offset, kv_offset, attention_mask) -> bool:
    """True when keys are exactly the tokens 0..M-1, queries are the last N and nothing is padded."""
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)):
        return False  # a static cache: offsets are tensors and the key buffer holds unfilled slots
    if kv_offset != 0 or q_offset + q_length != kv_length:
        return False
    return attention_mask is None or bool(attention_mask[:, -kv_length:].all())


class KernelGeometry:
    """What the mask function returns instead of a mask when the kernels' own geometry is exact: the
    native window of the layers the mask is for (transformers' ``local_size``; None: full attention)."""

    def __init__(self, local_size: int | None):
        self.local_size = local_size


def window_sink_mask(base: torch.Tensor, window: int | None, sink_tokens: int) -> torch.Tensor:
    """Restrict a boolean mask ``[..., N, M]`` (True = visible) to the window and the sinks.

    In each row, the k-th visible key (k = 1, 2, ...) stays visible when it is one of the last
    ``window`` visible keys or ``k <= sink_tokens``. With a causal base mask the last visible
    key is the query itself, so this is ``i - W < j <= i or j < S`` in the row's own positions.
    """
    if window is None:
        return base
    rank = base.cumsum(dim=-1)  # 1-based rank of each visible key; pads and other documents never count
    count = rank[..., -1:]
    keep = rank > count - window
    if sink_tokens:
        keep = keep | (rank <= sink_tokens)
    return base & keep


def causal_mask(q_len: int, kv_len: int, device, documents: torch.Tensor | None = None) -> torch.Tensor:
    """``[B or 1, 1, N, M]`` bottom-right aligned causal mask: query row r sits at position M - N + r.

    With ``documents`` ``[B, N]`` (packed rows, N == M) keys of another document are hidden too.
    """
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]
    if documents is not None:
        mask = mask & (documents[:, None, :, None] == documents[:, None, None, :])
    return mask


def packed_documents(position_ids: torch.Tensor | None, batch_size: int, q_len: int, kv_len: int):
    """Document ids ``[B, N]`` of packed rows (DataCollatorWithFlattening), or None when nothing is packed.

    A document starts wherever the position does not follow the previous one (transformers'
    ``find_packed_sequence_indices``). Only rows without cached keys (N == M) can be packed.
    """
    if position_ids is None or q_len != kv_len or position_ids.shape[-1] != q_len:
        return None
    return find_packed_sequence_indices(position_ids.expand(batch_size, -1))


def cu_seqlens_of(documents: torch.Tensor) -> torch.Tensor:
    """int32 ``[num_docs + 1]`` bounds of one row's document ids ``[N]``."""
    starts = torch.nonzero(documents[1:] != documents[:-1]).flatten() + 1
    bounds = [0, *starts.tolist(), documents.shape[0]]
    return torch.tensor(bounds, dtype=torch.int32, device=documents.device)


def dense_attention(query, key, value, mask, *, scaling, dropout, alibi_slopes, sink_logits, use_sdpa, softcap=None):
    """Softmax attention with an explicit mask; returns ``(out [B, N, Hq, D], weights or None)``.

    query ``[B, Hq, N, D]``, key/value ``[B, Hkv, M, D]``; mask ``[B or 1, 1, N, M]`` boolean
    (True = visible) or float (added to the scores). ``alibi_slopes`` ``[Hq]`` adds
    -slope * (i - j) with index distances (pads sit left of every real token, documents are
    contiguous, so index distance is token distance); ``sink_logits`` ``[Hq]`` is one extra
    softmax column without value. ``softcap`` caps the scaled scores, ``c * tanh(s / c)``, before the
    bias and the mask are added (Gemma 2). Fully masked rows (pad queries) get finfo.min scores,
    not -inf, so they stay finite as in transformers' eager masks.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    min_value = torch.finfo(query.dtype).min
    bias = torch.zeros((), dtype=query.dtype, device=query.device)
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, q_len, kv_len, query.device)[None].to(query.dtype)  # [1, Hq, N, M]
    if mask.dtype == torch.bool:
        bias = torch.where(mask, bias, min_value)
    else:
        bias = (bias + mask[..., -kv_len:].to(query.dtype)).clamp(min=min_value)
    if use_sdpa and sink_logits is None and softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + bias
    if sink_logits is not None:
        sink_column = sink_logits.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink_column], dim=-1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)[..., :kv_len]
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def flex_path(query, key, value, *, scaling, window, sink_tokens, alibi_slopes, sink_logits, cu_seqlens, softcap=None):
    """``flex_attention`` with a BlockMask for causal + window + sinks (+ documents); ``[B, N, Hq, D]``.

    Compiled on CUDA; eager (slow, forward only in practice) on the CPU. ``softcap`` caps the scaled
    score before the ALiBi bias, as :func:`dense_attention` does. Sink logits use
    flex's log-sum-exp: softmax over [scores, sink] = softmax(scores) * sigmoid(lse - sink).
    """
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    q_len, kv_len = query.shape[2], key.shape[2]
    offset = kv_len - q_len
    if cu_seqlens is None:
        doc = torch.zeros(kv_len, dtype=torch.int64, device=query.device)
        start = doc
    else:
        bounds = cu_seqlens.to(torch.int64)
        doc = torch.searchsorted(bounds, torch.arange(kv_len, device=query.device), right=True) - 1
        start = bounds[doc]

    def mask_mod(b, h, q_idx, kv_idx):
        q_abs = q_idx + offset
        ok = (kv_idx <= q_abs) & (doc[q_abs] == doc[kv_idx])
        if window is not None:
            ok = ok & ((kv_idx > q_abs - window) | (kv_idx - start[kv_idx] < sink_tokens))
        return ok

    score_mod = None
    slopes = None if alibi_slopes is None else alibi_slopes.to(device=query.device, dtype=torch.float32)
    if slopes is not None or softcap is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            if softcap is not None:
                score = torch.tanh(score / softcap) * softcap
            if slopes is not None:
                score = score - slopes[h] * (q_idx + offset - kv_idx)
            return score

    run = flex_attention if not query.is_cuda else torch.compile(flex_attention)
    block_mask = create_block_mask(mask_mod, None, None, q_len, kv_len, device=query.device)
    out, aux = run(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                   enable_gqa=query.shape[1] != key.shape[1], return_aux=AuxRequest(lse=True))
    if sink_logits is not None:
        out = out * torch.sigmoid(aux.lse - sink_logits.float().view(1, -1, 1))[..., None].to(out.dtype)
    return out.transpose(1, 2).contiguous()


def kernel_path(query, key, value, *, scaling, window, sink_tokens, alibi_slopes, sink_logits, cu_seqlens,
                backend, softcap=None):
    """``hf_longctx.kernels.flash_attention`` (imported on first use: it imports triton); ``[B, N, Hq, D]``."""
    from ..kernels import flash_attention

    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(device=query.device, dtype=torch.float32)
    out = flash_attention(query, key, value, causal=True, window=window, sink_tokens=sink_tokens if window else 0,
                          alibi_slopes=alibi_slopes, sink_logits=sink_logits, cu_seqlens=cu_seqlens, scale=scaling,
                          softcap=softcap, backend=backend)
    return out.transpose(1, 2).contiguous()
