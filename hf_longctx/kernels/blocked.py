"""Blocked pure-torch attention: the CPU path of `flash_attention`.

Queries are processed in blocks of `block_size` rows; each block attends only to the keys
its mask can reach (the sliding-window range `[first_pos - W + 1, last_pos]` plus the
sink keys), so a window of W costs O(N·W) time and O(block_size·(W + block_size)) memory
instead of O(N²). Blocks without sink logits run through SDPA's fused kernel. Packed
documents are attended one at a time. Differentiable through autograd; fp16/bf16 blocks
are computed in fp32, as the Triton kernel accumulates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import attend, visible

__all__ = ["blocked_attention"]


def _attend_sequence(q, k, v, *, causal, window, sink_tokens, alibi_slopes, sink_logits, scale, block_size):
    """One unpacked sequence: q `[B, Hq, N, D]`, k/v `[B, Hkv, M, D]`, queries bottom-right aligned."""
    n, m = q.shape[2], k.shape[2]
    work_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    outputs = []
    for r0 in range(0, n, block_size):
        r1 = min(n, r0 + block_size)
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
        qb, kb, vb = q[:, :, r0:r1].to(work_dtype), kb.to(work_dtype), vb.to(work_dtype)
        if sink_logits is None:
            # SDPA's fused CPU kernel is about twice as fast as matmul + softmax; it has no sink column.
            if alibi_slopes is not None:
                distance = (q_pos[:, None] - k_pos[None, :]).abs().to(work_dtype)
                mask = (-alibi_slopes.to(work_dtype)[:, None, None] * distance).masked_fill(~mask, float("-inf"))
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)
        else:
            out = attend(qb, kb, vb, mask, q_pos, k_pos, alibi_slopes, sink_logits, scale)
        outputs.append(out.to(q.dtype))
    return torch.cat(outputs, dim=2)


def blocked_attention(q, k, v, *, causal, window, sink_tokens, alibi_slopes, sink_logits, cu_seqlens, scale,
                      block_size: int = 128):
    """Attention with `flash_attention` semantics on already validated inputs (see `check_inputs`).

    q `[B, Hq, N, D]`, k/v `[B, Hkv, M, D]` -> `[B, Hq, N, D]`; cu_seqlens int32 `[num_docs + 1]`
    or None; scale a float. `block_size` query rows are processed per step.
    """
    options = dict(causal=causal, window=window, sink_tokens=sink_tokens, alibi_slopes=alibi_slopes,
                   sink_logits=sink_logits, scale=scale, block_size=block_size)
    if cu_seqlens is None:
        return _attend_sequence(q, k, v, **options)
    bounds = cu_seqlens.tolist()
    return torch.cat([_attend_sequence(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], **options)
                      for s, e in zip(bounds, bounds[1:]) if e > s], dim=2)
