"""Blocked pure-torch attention: the CPU path of `flash_attention`.

Queries are processed in blocks of `block_size` rows, aligned to the last query (only the
first block may be shorter); each block attends only to the keys its mask can reach (the
sliding-window range `[first_pos - W + 1, last_pos]` plus the sink keys), so a window of W
costs O(N·(W + block_size)) time and memory instead of O(N·M).

With a sliding window, every full block whose window range starts after the sink keys
sees the same mask relative to its own key band, so those blocks run batched, in one call
(or a few, if the call would materialise more than `_CALL_ELEMENTS`): the bands of
W - 1 + block_size keys are strided views of K/V (`unfold`), the query blocks are folded
into the batch dimension, and one `[block_size, S + W - 1 + block_size]` mask serves them
all. The rows before the band (whose window reaches back into the sink keys or before the
first key) go as one block, under the same limit. Few, large calls keep the path fast when a parallel region
waits on a descheduled thread (a loaded machine). Without a window, and for ALiBi with
sink tokens (the sink distance differs per block), every block goes on its own.

All forms share `_attend_rows`: SDPA's fused kernel without sink logits or a softcap,
matmul + softmax with either. Packed documents are attended one at a time. Differentiable through autograd;
fp16/bf16 are computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import attend, visible

__all__ = ["blocked_attention"]

# Elements one call may materialise (masks, scores with sink logits or a softcap, copied K/V bands):
# 2**26 fp32 values are 256 MiB, and at that size the per-call overhead is long amortised.
_CALL_ELEMENTS = 1 << 26


def _materialises_scores(sink_logits, softcap) -> bool:
    """Whether `_attend_rows` computes matmul + softmax (materialising the scores) rather than calling SDPA."""
    return sink_logits is not None or softcap is not None


def _attend_rows(q, k, v, mask, q_pos, k_pos, *, alibi_slopes, sink_logits, softcap, scale):
    """Softmax attention of q `[X, Hq, n, D]` over k/v `[X, Hkv, m, D]`, one `[n, m]` mask for all X.

    mask bool `[n, m]` (True = visible); q_pos `[n]` / k_pos `[m]` are read only for ALiBi
    (pass None without it), where only their differences matter. Returns `[X, Hq, n, D]`.
    """
    if _materialises_scores(sink_logits, softcap):
        return attend(q, k, v, mask, q_pos, k_pos, alibi_slopes, sink_logits, scale, softcap)
    # SDPA's fused CPU kernel is about twice as fast as matmul + softmax; it has no sink column and no softcap.
    if alibi_slopes is not None:
        distance = (q_pos[:, None] - k_pos[None, :]).abs().to(q.dtype)
        mask = (-alibi_slopes.to(q.dtype)[:, None, None] * distance).masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def _attend_block(q, k, v, r0, r1, *, causal, window, sink_tokens, alibi_slopes, sink_logits, softcap, scale):
    """Query rows [r0, r1) of one sequence (q `[B, Hq, N, D]`, k/v `[B, Hkv, M, D]`) -> `[B, Hq, r1 - r0, D]`."""
    n, m = q.shape[2], k.shape[2]
    first, last = m - n + r0, m - n + r1 - 1  # positions of the block's first and last query
    hi = min(m, last + 1) if causal else m
    lo = max(0, first - window + 1) if window is not None else 0
    sink_end = min(sink_tokens, lo) if window is not None else 0
    k_pos = torch.arange(lo, hi, device=q.device)
    kb, vb = k[:, :, lo:hi], v[:, :, lo:hi]
    if sink_end:
        k_pos = torch.cat([torch.arange(sink_end, device=q.device), k_pos])
        kb = torch.cat([k[:, :, :sink_end], kb], dim=2)
        vb = torch.cat([v[:, :, :sink_end], vb], dim=2)
    q_pos = torch.arange(first, last + 1, device=q.device)
    mask = visible(q_pos, k_pos, causal=causal, window=window, sink_tokens=sink_tokens)
    return _attend_rows(q[:, :, r0:r1], kb, vb, mask, q_pos, k_pos, alibi_slopes=alibi_slopes,
                        sink_logits=sink_logits, softcap=softcap, scale=scale)


def _band_start(n: int, m: int, *, window, sink_tokens, alibi_slopes, block_size) -> int | None:
    """First query row of the band blocks (n when none qualify; None when the band form does not apply).

    Band blocks end at row n in steps of block_size; a block joins when its window range
    starts at or after the sink keys: position first - W + 1 >= S.
    """
    if window is None or (sink_tokens and alibi_slopes is not None):
        return None
    head = n % block_size  # a short first block never joins
    need = n - m + window - 1 + sink_tokens  # smallest row whose window range starts at key S
    return min(n, head + block_size * max(0, -(-(need - head) // block_size)))


def _rows_per_call(per_row: int, block_size: int) -> int:
    """Query rows per call, a multiple of block_size, that keep per_row elements each under `_CALL_ELEMENTS`."""
    return block_size * max(1, _CALL_ELEMENTS // max(1, block_size * per_row))


def _attend_band(q, k, v, r0, r1, *, window, sink_tokens, alibi_slopes, sink_logits, softcap, scale, block_size):
    """Query rows [r0, r1) of one sequence, full blocks of block_size rows, in one batched call.

    q `[B, Hq, N, D]`, k/v `[B, Hkv, M, D]` -> `[B, Hq, r1 - r0, D]`. Block i (queries at
    positions p .. p + block_size - 1, p = M - N + r0 + i·block_size) sees its band of
    L = W - 1 + block_size keys starting at p - W + 1 >= S, plus the S sink keys, all under
    the same `[block_size, S + L]` mask. The bands are a strided view of K/V
    `[B·blocks, Hkv, L, D]`, copied only for B > 1 or sinks.
    """
    b, hq, n, d = q.shape
    m, num_blocks, band = k.shape[2], (r1 - r0) // block_size, window - 1 + block_size
    keys = slice(m - n + r0 - window + 1, m - n + r1)

    def bands(t):  # [B, H, M, D] -> [B·blocks, H, S + L, D]
        t_band = t[:, :, keys].unfold(2, band, block_size).transpose(-1, -2).movedim(2, 1)
        if sink_tokens:
            t_band = torch.cat([t[:, None, :, :sink_tokens].expand(b, num_blocks, -1, -1, -1), t_band], dim=3)
        return t_band.flatten(0, 1)

    qb = q[:, :, r0:r1].unflatten(2, (num_blocks, block_size)).movedim(2, 1).flatten(0, 1)
    # Positions relative to the band's first key: query j of a block sits W - 1 + j keys in.
    q_pos = torch.arange(window - 1, band, device=q.device)
    k_pos = torch.arange(band, device=q.device)
    mask = visible(q_pos, k_pos, causal=True, window=window, sink_tokens=0)
    if sink_tokens:  # sink keys lie before every band, so causal and visible to every query
        mask = torch.cat([mask.new_ones(block_size, sink_tokens), mask], dim=1)
    positions = (q_pos, k_pos) if alibi_slopes is not None else (None, None)  # never ALiBi with sinks here
    out = _attend_rows(qb, bands(k), bands(v), mask, *positions, alibi_slopes=alibi_slopes, sink_logits=sink_logits,
                       softcap=softcap, scale=scale)
    return out.unflatten(0, (b, num_blocks)).movedim(1, 2).reshape(b, hq, r1 - r0, d)


def _attend_sequence(q, k, v, *, causal, window, sink_tokens, alibi_slopes, sink_logits, softcap, scale,
                     block_size):
    """One unpacked sequence: q `[B, Hq, N, D]`, k/v `[B, Hkv, M, D]`, queries bottom-right aligned.

    With the band form, the rows before the band (fewer than W + S + 2·block_size) and the
    band each go in as few calls as `_CALL_ELEMENTS` allows (one each, unless W or the
    scores are large); otherwise every block of block_size rows goes on its own.
    """
    (b, hq, n, d), hkv, m = q.shape, k.shape[1], k.shape[2]
    options = dict(window=window, sink_tokens=sink_tokens, alibi_slopes=alibi_slopes, sink_logits=sink_logits,
                   softcap=softcap, scale=scale)
    band_start = _band_start(n, m, window=window, sink_tokens=sink_tokens, alibi_slopes=alibi_slopes,
                             block_size=block_size)
    if band_start is None:
        band_start = n
        bounds = [0, *range(n % block_size or block_size, n, block_size), n]
    else:
        scores = b * hq if _materialises_scores(sink_logits, softcap) else 0  # [B, Hq, rows, keys]
        lead_keys = sink_tokens + window - 1 + band_start  # at most, for rows before the band; mask [rows, keys]
        band_keys = sink_tokens + window - 1 + block_size  # one mask for all band blocks
        copies = 2 * b * hkv * band_keys * d // block_size if b > 1 or sink_tokens else 0  # K/V bands, per row
        bounds = [*range(0, band_start, _rows_per_call(lead_keys * max(1, scores), block_size)),
                  *range(band_start, n, _rows_per_call(band_keys * scores + copies, block_size)), n]
    outputs = []
    for r0, r1 in zip(bounds, bounds[1:]):
        if r0 >= band_start:
            outputs.append(_attend_band(q, k, v, r0, r1, block_size=block_size, **options))
        else:
            outputs.append(_attend_block(q, k, v, r0, r1, causal=causal, **options))
    return torch.cat(outputs, dim=2)


def blocked_attention(q, k, v, *, causal, window, sink_tokens, alibi_slopes, sink_logits, softcap, cu_seqlens, scale,
                      block_size: int = 128):
    """Attention with `flash_attention` semantics on already validated inputs (see `check_inputs`).

    q `[B, Hq, N, D]`, k/v `[B, Hkv, M, D]` -> `[B, Hq, N, D]`; cu_seqlens int32 `[num_docs + 1]`
    or None; scale a float. `block_size` query rows are processed per step. fp16/bf16 are
    computed in fp32, as the Triton kernel accumulates.
    """
    options = dict(causal=causal, window=window, sink_tokens=sink_tokens, alibi_slopes=alibi_slopes,
                   sink_logits=sink_logits, softcap=softcap, scale=scale, block_size=block_size)
    # Cast once, before K/V are viewed as overlapping bands: a cast of the bands would copy them.
    work_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qw, kw, vw = q.to(work_dtype), k.to(work_dtype), v.to(work_dtype)
    if cu_seqlens is None:
        return _attend_sequence(qw, kw, vw, **options).to(q.dtype)
    bounds = cu_seqlens.tolist()
    return torch.cat([_attend_sequence(qw[:, :, s:e], kw[:, :, s:e], vw[:, :, s:e], **options)
                      for s, e in zip(bounds, bounds[1:]) if e > s], dim=2).to(q.dtype)
