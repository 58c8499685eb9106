"""Flash attention with sliding windows, attention sinks, ALiBi, sink logits and packed documents.

Four layers, in order: the Triton kernels (forward, backward dq, backward dk/dv), the
launcher (block tables, grids), the autograd.Function, and the public `flash_attention`,
which dispatches between this kernel, the blocked CPU path and the dense reference.

Loop bounds come from host-computed block tables (`key_block_ranges`,
`query_block_ranges`): each program visits exactly the key (or query) blocks its mask
reaches, so a window of W costs O(N·W). The tables are plain torch and tested directly.

Triton is imported with this module and `triton.jit` decides at import time whether
kernels run in the interpreter, so on a CPU set `TRITON_INTERPRET=1` before the first
import of `hf_longctx` to use `backend="triton"`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from .blocked import blocked_attention
from .reference import check_inputs, flash_attention_reference

__all__ = ["flash_attention", "key_block_ranges", "query_block_ranges"]

LOG2E = 1.4426950408889634
MASKED = -1.0e30  # finite, so a row whose first visited block is fully masked stays NaN-free


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _seq_bounds(CU_SEQLENS, seq, seq_q, seq_k, IS_VARLEN: tl.constexpr):
    """(batch index, first token, query count, key count) of sequence `seq` (a batch row or a document)."""
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + seq)
        length = tl.load(CU_SEQLENS + seq + 1) - start
        return 0, start, length, length
    else:
        return seq, 0, seq_q, seq_k


@triton.jit
def _masked_scores(s, q_pos, k_pos, q_ok, k_ok, slope2, window, sink_tokens,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scores in log2 units `[BLOCK_M, BLOCK_N]` with the ALiBi bias added and invisible pairs at MASKED."""
    if HAS_ALIBI:
        s -= slope2 * tl.abs(q_pos[:, None] - k_pos[None, :]).to(tl.float32)
    ok = q_ok[:, None] & k_ok[None, :]
    if CAUSAL:
        ok &= k_pos[None, :] <= q_pos[:, None]
    if HAS_WINDOW:
        ok &= (k_pos[None, :] > q_pos[:, None] - window) | (k_pos[None, :] < sink_tokens)
    return tl.where(ok, s, -1.0e30)


@triton.jit
def _fwd_inner(m_i, l_i, acc, q, K_base, V_base, stride_kn, stride_vn, block_lo, block_hi, q_pos, q_ok,
               k_len, head_dim, qk_scale, slope2, window, sink_tokens,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax accumulation over key blocks [block_lo, block_hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    for blk in range(block_lo, block_hi):
        k_pos = blk * BLOCK_N + offs_n
        k_ok = k_pos < k_len
        kt = tl.load(K_base + k_pos[None, :] * stride_kn + offs_d[:, None], mask=d_ok[:, None] & k_ok[None, :],
                     other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = _masked_scores(s, q_pos, k_pos, q_ok, k_ok, slope2, window, sink_tokens, CAUSAL, HAS_WINDOW, HAS_ALIBI)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_base + k_pos[:, None] * stride_vn + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SLOPES, SINKS, CU_SEQLENS, KV_BLOCKS,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                num_heads, group_size, seq_q, seq_k, head_dim, num_q_blocks, qk_scale, window, sink_tokens,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
                HAS_SINK_LOGITS: tl.constexpr, IS_VARLEN: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (query block, sequence x head); writes O and the log2-sum-exp LSE `[B, Hq, N]`."""
    pid_m = tl.program_id(0)
    seq = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    batch, start, q_len, k_len = _seq_bounds(CU_SEQLENS, seq, seq_q, seq_k, IS_VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return
    kv_head = head // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = rows < q_len
    d_ok = offs_d < head_dim
    q = tl.load(Q + batch * stride_qb + head * stride_qh + (start + rows)[:, None] * stride_qn + offs_d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = rows + (k_len - q_len)
    slope2 = tl.load(SLOPES + head).to(tl.float32) * 1.4426950408889634 if HAS_ALIBI else 0.0
    if HAS_SINK_LOGITS:
        # The sink column enters the online softmax as its first element: max = sink, sum = 1, no value.
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINKS + head).to(tl.float32) * 1.4426950408889634
        l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    K_base = K + batch * stride_kb + kv_head * stride_kh + start * stride_kn
    V_base = V + batch * stride_vb + kv_head * stride_vh + start * stride_vn
    table = KV_BLOCKS + ((seq if IS_VARLEN else 0) * num_q_blocks + pid_m) * 3
    sink_end, win_start, win_end = tl.load(table), tl.load(table + 1), tl.load(table + 2)
    m_i, l_i, acc = _fwd_inner(m_i, l_i, acc, q, K_base, V_base, stride_kn, stride_vn, 0, sink_end, q_pos, q_ok,
                               k_len, head_dim, qk_scale, slope2, window, sink_tokens,
                               CAUSAL, HAS_WINDOW, HAS_ALIBI, BLOCK_N, BLOCK_D, DOT_PRECISION)
    m_i, l_i, acc = _fwd_inner(m_i, l_i, acc, q, K_base, V_base, stride_kn, stride_vn, win_start, win_end, q_pos,
                               q_ok, k_len, head_dim, qk_scale, slope2, window, sink_tokens,
                               CAUSAL, HAS_WINDOW, HAS_ALIBI, BLOCK_N, BLOCK_D, DOT_PRECISION)
    acc = acc / l_i[:, None]
    tl.store(O + batch * stride_ob + head * stride_oh + (start + rows)[:, None] * stride_on + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (batch * num_heads + head) * seq_q + start + rows, m_i + tl.log2(l_i), mask=q_ok)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_vn, block_lo, block_hi, q_pos, q_ok,
              k_len, head_dim, qk_scale, slope2, window, sink_tokens,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq += dS @ K over key blocks [block_lo, block_hi), with dS = P * (dO @ V^T - delta)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    for blk in range(block_lo, block_hi):
        k_pos = blk * BLOCK_N + offs_n
        k_ok = k_pos < k_len
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K_base + k_pos[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_base + k_pos[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _masked_scores(s, q_pos, k_pos, q_ok, k_ok, slope2, window, sink_tokens, CAUSAL, HAS_WINDOW, HAS_ALIBI)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, SLOPES, CU_SEQLENS, KV_BLOCKS,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                   num_heads, group_size, seq_q, seq_k, head_dim, num_q_blocks, qk_scale, sm_scale, window,
                   sink_tokens,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   IS_VARLEN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (query block, sequence x head), same grid and block table as the forward; DQ is laid out like Q."""
    pid_m = tl.program_id(0)
    seq = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    batch, start, q_len, k_len = _seq_bounds(CU_SEQLENS, seq, seq_q, seq_k, IS_VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return
    kv_head = head // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = rows < q_len
    qd_mask = q_ok[:, None] & (offs_d < head_dim)[None, :]
    q_off = batch * stride_qb + head * stride_qh + (start + rows)[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(Q + q_off, mask=qd_mask, other=0.0)
    do = tl.load(DO + batch * stride_dob + head * stride_doh + (start + rows)[:, None] * stride_don + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    row_off = (batch * num_heads + head) * seq_q + start + rows
    lse2 = tl.load(LSE + row_off, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + row_off, mask=q_ok, other=0.0)
    q_pos = rows + (k_len - q_len)
    slope2 = tl.load(SLOPES + head).to(tl.float32) * 1.4426950408889634 if HAS_ALIBI else 0.0
    K_base = K + batch * stride_kb + kv_head * stride_kh + start * stride_kn
    V_base = V + batch * stride_vb + kv_head * stride_vh + start * stride_vn
    table = KV_BLOCKS + ((seq if IS_VARLEN else 0) * num_q_blocks + pid_m) * 3
    sink_end, win_start, win_end = tl.load(table), tl.load(table + 1), tl.load(table + 2)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_vn, 0, sink_end, q_pos, q_ok, k_len,
                   head_dim, qk_scale, slope2, window, sink_tokens, CAUSAL, HAS_WINDOW, HAS_ALIBI, BLOCK_N, BLOCK_D,
                   DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_vn, win_start, win_end, q_pos, q_ok,
                   k_len, head_dim, qk_scale, slope2, window, sink_tokens, CAUSAL, HAS_WINDOW, HAS_ALIBI, BLOCK_N,
                   BLOCK_D, DOT_PRECISION)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, SLOPES, CU_SEQLENS, Q_BLOCKS,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                     num_heads, num_kv_heads, group_size, seq_q, seq_k, head_dim, num_k_blocks, qk_scale, sm_scale,
                     window, sink_tokens,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     IS_VARLEN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (key block, sequence x kv head). It loops over the query heads of its GQA
    group itself, so dK/dV are summed over the group without atomics (deterministic).
    DK/DV are laid out like K/V."""
    pid_n = tl.program_id(0)
    seq = tl.program_id(1) // num_kv_heads
    kv_head = tl.program_id(1) % num_kv_heads
    batch, start, q_len, k_len = _seq_bounds(CU_SEQLENS, seq, seq_q, seq_k, IS_VARLEN)
    if pid_n * BLOCK_N >= k_len:
        return
    k_pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    k_ok = k_pos < k_len
    d_ok = offs_d < head_dim
    kd_mask = k_ok[:, None] & d_ok[None, :]
    k_off = batch * stride_kb + kv_head * stride_kh + (start + k_pos)[:, None] * stride_kn + offs_d[None, :]
    v_off = batch * stride_vb + kv_head * stride_vh + (start + k_pos)[:, None] * stride_vn + offs_d[None, :]
    k = tl.load(K + k_off, mask=kd_mask, other=0.0)
    v = tl.load(V + v_off, mask=kd_mask, other=0.0)
    table = Q_BLOCKS + ((seq if IS_VARLEN else 0) * num_k_blocks + pid_n) * 2
    q_block_lo, q_block_hi = tl.load(table), tl.load(table + 1)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(group_size):
        head = kv_head * group_size + g
        slope2 = tl.load(SLOPES + head).to(tl.float32) * 1.4426950408889634 if HAS_ALIBI else 0.0
        Q_base = Q + batch * stride_qb + head * stride_qh + start * stride_qn
        DO_base = DO + batch * stride_dob + head * stride_doh + start * stride_don
        row_base = (batch * num_heads + head) * seq_q + start
        for blk in range(q_block_lo, q_block_hi):
            rows = blk * BLOCK_M + offs_m
            q_ok = rows < q_len
            qd_mask = q_ok[:, None] & d_ok[None, :]
            q = tl.load(Q_base + rows[:, None] * stride_qn + offs_d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(DO_base + rows[:, None] * stride_don + offs_d[None, :], mask=qd_mask, other=0.0)
            lse2 = tl.load(LSE + row_base + rows, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + row_base + rows, mask=q_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            s = _masked_scores(s, rows + (k_len - q_len), k_pos, q_ok, k_ok, slope2, window, sink_tokens,
                               CAUSAL, HAS_WINDOW, HAS_ALIBI)
            p = tl.exp2(s - lse2[:, None])
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION)
    tl.store(DK + k_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + v_off, dv.to(DV.dtype.element_ty), mask=kd_mask)
