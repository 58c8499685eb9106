"""Flash attention with sliding windows, attention sinks, ALiBi, sink logits, logit softcaps and packed documents.

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

LOG2E = tl.constexpr(1.4426950408889634)  # scores are kept in log2 units so the kernels can use exp2
# Finite rather than -inf: a row whose first visited block is fully masked then gets
# exp2(MASKED - MASKED) = 1 garbage that the next real maximum rescales by exp2(MASKED - m) = 0, not NaN.
MASKED = tl.constexpr(-1.0e30)


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
def _tanh(x):
    """tanh of fp32 x from core ops only (Cephes' tanhf; within 2 ulp in the interpreter): libdevice is
    not available in the interpreter, and 1 - 2 / (exp(2|x|) + 1) alone loses the relative precision near 0."""
    a = tl.abs(x)
    z = x * x
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
             - 3.33332819422e-1) * z * x + x
    # tanh rounds to 1 in fp32 from |x| = 9.1 on; the clamp keeps exp finite. div_rn: IEEE division on GPUs too.
    large = 1.0 - tl.math.div_rn(tl.full(a.shape, 2.0, tl.float32), tl.exp(2.0 * tl.minimum(a, 10.0)) + 1.0)
    return tl.where(a < 0.625, small, tl.where(x < 0, -large, large))


@triton.jit
def _scores(q, kt, qk_scale, softcap2, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(scores, t): scores `[BLOCK_M, BLOCK_N]` in log2 units, capped, before ALiBi and mask.

    Without a softcap qk_scale is scale·log2(e) and t is unused. With one, qk_scale is
    scale / softcap and softcap2 is softcap·log2(e), so scores = softcap2 · t with
    t = tanh(q·k·scale / softcap), which the backward needs for d raw = d capped · (1 - t²).
    """
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if HAS_SOFTCAP:
        t = _tanh(s)
        return t * softcap2, t
    else:
        return s, s


@triton.jit
def _raw_score_grads(p, dp, delta, t, HAS_SOFTCAP: tl.constexpr):
    """d loss / d (q·k·scale), the uncapped scores: P · (dO·V^T - delta), times 1 - t² with a softcap."""
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds *= 1.0 - t * t
    return ds


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
    return tl.where(ok, s, MASKED)


@triton.jit
def _fwd_inner(m_i, l_i, acc, q, K_base, V_base, stride_kn, stride_vn, block_lo, block_hi, q_pos, q_ok,
               k_len, head_dim, qk_scale, softcap2, slope2, window, sink_tokens,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
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
        s, _ = _scores(q, kt, qk_scale, softcap2, HAS_SOFTCAP, DOT_PRECISION)
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
                num_heads, group_size, seq_q, seq_k, head_dim, num_q_blocks, qk_scale, softcap2, window,
                sink_tokens,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
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
    slope2 = tl.load(SLOPES + head).to(tl.float32) * LOG2E if HAS_ALIBI else 0.0
    if HAS_SINK_LOGITS:
        # The sink column enters the online softmax as its first element: max = sink, sum = 1, no value.
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINKS + head).to(tl.float32) * LOG2E
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
                               k_len, head_dim, qk_scale, softcap2, slope2, window, sink_tokens,
                               CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, BLOCK_N, BLOCK_D, DOT_PRECISION)
    m_i, l_i, acc = _fwd_inner(m_i, l_i, acc, q, K_base, V_base, stride_kn, stride_vn, win_start, win_end, q_pos,
                               q_ok, k_len, head_dim, qk_scale, softcap2, slope2, window, sink_tokens,
                               CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_SOFTCAP, BLOCK_N, BLOCK_D, DOT_PRECISION)
    acc = acc / l_i[:, None]
    tl.store(O + batch * stride_ob + head * stride_oh + (start + rows)[:, None] * stride_on + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (batch * num_heads + head) * seq_q + start + rows, m_i + tl.log2(l_i), mask=q_ok)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_vn, block_lo, block_hi, q_pos, q_ok,
              k_len, head_dim, qk_scale, softcap2, slope2, window, sink_tokens,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq += dS @ K over key blocks [block_lo, block_hi), with dS = `_raw_score_grads`."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    for blk in range(block_lo, block_hi):
        k_pos = blk * BLOCK_N + offs_n
        k_ok = k_pos < k_len
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K_base + k_pos[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_base + k_pos[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s, t = _scores(q, tl.trans(k), qk_scale, softcap2, HAS_SOFTCAP, DOT_PRECISION)
        s = _masked_scores(s, q_pos, k_pos, q_ok, k_ok, slope2, window, sink_tokens, CAUSAL, HAS_WINDOW, HAS_ALIBI)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = _raw_score_grads(p, dp, delta, t, HAS_SOFTCAP)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, SLOPES, CU_SEQLENS, KV_BLOCKS,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                   num_heads, group_size, seq_q, seq_k, head_dim, num_q_blocks, qk_scale, softcap2, sm_scale,
                   window, sink_tokens,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   IS_VARLEN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (query block, sequence x head), like the forward; DQ is laid out like Q."""
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
    slope2 = tl.load(SLOPES + head).to(tl.float32) * LOG2E if HAS_ALIBI else 0.0
    K_base = K + batch * stride_kb + kv_head * stride_kh + start * stride_kn
    V_base = V + batch * stride_vb + kv_head * stride_vh + start * stride_vn
    table = KV_BLOCKS + ((seq if IS_VARLEN else 0) * num_q_blocks + pid_m) * 3
    sink_end, win_start, win_end = tl.load(table), tl.load(table + 1), tl.load(table + 2)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_vn, 0, sink_end, q_pos, q_ok, k_len,
                   head_dim, qk_scale, softcap2, slope2, window, sink_tokens, CAUSAL, HAS_WINDOW, HAS_ALIBI,
                   HAS_SOFTCAP, BLOCK_N, BLOCK_D, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_vn, win_start, win_end, q_pos, q_ok,
                   k_len, head_dim, qk_scale, softcap2, slope2, window, sink_tokens, CAUSAL, HAS_WINDOW, HAS_ALIBI,
                   HAS_SOFTCAP, BLOCK_N, BLOCK_D, DOT_PRECISION)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, SLOPES, CU_SEQLENS, Q_BLOCKS,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                     num_heads, num_kv_heads, group_size, seq_q, seq_k, head_dim, num_k_blocks, qk_scale, softcap2,
                     sm_scale, window, sink_tokens,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, IS_VARLEN: tl.constexpr,
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
        slope2 = tl.load(SLOPES + head).to(tl.float32) * LOG2E if HAS_ALIBI else 0.0
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
            s, t = _scores(q, tl.trans(k), qk_scale, softcap2, HAS_SOFTCAP, DOT_PRECISION)
            s = _masked_scores(s, rows + (k_len - q_len), k_pos, q_ok, k_ok, slope2, window, sink_tokens,
                               CAUSAL, HAS_WINDOW, HAS_ALIBI)
            p = tl.exp2(s - lse2[:, None])
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = _raw_score_grads(p, dp, delta, t, HAS_SOFTCAP)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION)
    tl.store(DK + k_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + v_off, dv.to(DV.dtype.element_ty), mask=kd_mask)


# ---------------------------------------------------------------------------------------- launcher


def _cdiv(a, b):
    return -(-a // b)


def _lengths(cu_seqlens: torch.Tensor | None, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence query and key counts (int64, CPU): one unpacked sequence, or one per document."""
    if cu_seqlens is None:
        return torch.tensor([n]), torch.tensor([m])
    doc_lens = cu_seqlens.cpu().to(torch.int64).diff()
    return doc_lens, doc_lens


def key_block_ranges(q_lens, k_lens, block_m: int, block_n: int, *, causal: bool, window: int | None,
                     sink_tokens: int) -> torch.Tensor:
    """Key blocks each query block must visit: int32 `[num_seqs, num_q_blocks, 3]` on the CPU.

    Row `(sink_end, win_start, win_end)`: the kernel visits key blocks `[0, sink_end)` (sink
    keys) and `[win_start, win_end)` (the causal window), and nothing else; every visited
    block holds at least one visible pair. q_lens/k_lens `[num_seqs]`: queries and keys per
    sequence (bottom-right aligned). Query blocks past a sequence's end get empty ranges.
    """
    q_lens = torch.as_tensor(q_lens, dtype=torch.int64)[:, None]
    k_lens = torch.as_tensor(k_lens, dtype=torch.int64)[:, None]
    r0 = torch.arange(_cdiv(int(q_lens.max()), block_m))[None, :] * block_m
    first = k_lens - q_lens + r0
    last = k_lens - q_lens + torch.minimum(r0 + block_m, q_lens) - 1
    hi = torch.minimum(k_lens, last + 1) if causal else torch.broadcast_to(k_lens, first.shape)
    lo = (first - window + 1).clamp(min=0) if window is not None else torch.zeros_like(first)
    win_start = lo // block_n
    win_end = torch.maximum(_cdiv(hi, block_n), win_start)
    sink_end = (torch.minimum(torch.full_like(win_start, _cdiv(sink_tokens, block_n)), win_start)
                if window is not None else torch.zeros_like(win_start))
    table = torch.stack([sink_end, win_start, win_end], dim=-1)
    return table.masked_fill((r0 >= q_lens)[..., None], 0).to(torch.int32)


def query_block_ranges(q_lens, k_lens, block_m: int, block_n: int, *, causal: bool, window: int | None,
                       sink_tokens: int) -> torch.Tensor:
    """Query blocks that see each key block: int32 `[num_seqs, num_k_blocks, 2]` on the CPU.

    Row `(start, end)`: the dK/dV kernel visits query blocks `[start, end)` only; the exact
    transpose of `key_block_ranges` (for blocks of the same sizes).
    """
    q_lens = torch.as_tensor(q_lens, dtype=torch.int64)[:, None]
    k_lens = torch.as_tensor(k_lens, dtype=torch.int64)[:, None]
    n0 = torch.arange(_cdiv(int(k_lens.max()), block_n))[None, :] * block_n
    n1 = torch.minimum(n0 + block_n, k_lens)
    offset = k_lens - q_lens  # query row r sits at position r + offset
    row_hi = torch.broadcast_to(q_lens, (q_lens.shape[0], n0.shape[1]))
    row_lo = (n0 - offset).clamp(min=0) if causal else torch.zeros_like(row_hi)
    if window is not None:
        # The last query whose window still reaches key n1 - 1 sits at n1 - 2 + W; sink keys reach all.
        row_hi = torch.where(n0 < sink_tokens, row_hi, torch.minimum(row_hi, (n1 - 1 + window - offset).clamp(min=0)))
    start = row_lo // block_m
    table = torch.stack([start, torch.maximum(_cdiv(row_hi, block_m), start)], dim=-1)
    return table.masked_fill((n0 >= k_lens)[..., None], 0).to(torch.int32)


# Launch configurations of the three kernels per (compute capability, head-dim bucket): block sizes, warps and
# pipeline stages. Chosen by compiling every kernel x mask variant ahead of time (`hf_longctx.kernels.aot`) so that
# the forward never spills registers and the backward spills no more than Triton's tutorial backward compiled the
# same way, with shared memory within the architecture's per-block limit. Filled in below.
LAUNCH_CONFIGS: dict[tuple[int, int], dict[str, dict]] = {}


def head_dim_bucket(head_dim: int) -> int:
    """The kernels' padded head dim (BLOCK_D): a power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


def launch_config(capability: tuple[int, int] | int, head_dim: int) -> dict[str, dict]:
    """The launch configuration of each kernel (``fwd``, ``dq``, ``dkdv``) for a GPU of compute capability
    ``capability`` (``(8, 0)`` or ``80``) and a head dim: ``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``.

    sm_80 (A100) and sm_90 (H100/H200) have their own rows. Data-centre Blackwell (sm_100/103, sm_110) has
    Hopper's 227 KB of shared memory per block and takes sm_90's rows; every other part takes sm_80's, whose
    blocks use at most 72 KB of shared memory and so also fit the 99 KB of sm_86/89 and consumer Blackwell
    (sm_120)."""
    arch = capability[0] * 10 + capability[1] if isinstance(capability, tuple) else int(capability)
    arch = 90 if 90 <= arch < 120 else 80
    buckets = sorted(b for a, b in LAUNCH_CONFIGS if a == arch)
    bucket = next((b for b in buckets if b >= head_dim_bucket(head_dim)), buckets[-1])
    return {kernel: dict(cfg) for kernel, cfg in LAUNCH_CONFIGS[(arch, bucket)].items()}


def _launch_config(q: torch.Tensor) -> dict:
    """Block sizes and warps per kernel. The interpreter gets small blocks so tests cross block edges."""
    if not q.is_cuda:
        if not knobs.runtime.interpret:
            raise RuntimeError("backend='triton' on a CPU tensor needs the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before hf_longctx (and triton) are first imported, or use "
                               "backend='blocked'")
        small = dict(BLOCK_M=32, BLOCK_N=32, num_warps=1, num_stages=1)
        return dict(fwd=small, dq=small, dkdv=small)
    return launch_config(torch.cuda.get_device_capability(q.device), q.shape[-1])


def _launch(kernel, grid, *args, **kwargs):
    kernel[grid](*args, **kwargs)


def _common_args(q, k, v, cu_seqlens, causal, window, sink_tokens, alibi_slopes, softcap, scale) -> dict:
    """Pointers, constexpr flags and scalars shared by the three kernels' launches."""
    d = q.shape[-1]
    return dict(
        # See `_scores`: with a softcap the kernels scale by 1 / softcap before tanh, by softcap after.
        qk_scale=scale * LOG2E.value if softcap is None else scale / softcap,
        softcap2=0.0 if softcap is None else softcap * LOG2E.value, HAS_SOFTCAP=softcap is not None,
        CU_SEQLENS=q if cu_seqlens is None else cu_seqlens,  # unread placeholders keep the signature fixed
        SLOPES=q if alibi_slopes is None else alibi_slopes.to(q.device, torch.float32).contiguous(),
        window=window or 0, sink_tokens=sink_tokens, head_dim=d,
        seq_q=q.shape[2], seq_k=k.shape[2], group_size=q.shape[1] // k.shape[1],
        CAUSAL=causal, HAS_WINDOW=window is not None, HAS_ALIBI=alibi_slopes is not None,
        IS_VARLEN=cu_seqlens is not None, BLOCK_D=head_dim_bucket(d),
        # fp32 inputs get exact fp32 products; on GPUs tl.dot would otherwise round them to TF32.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _strides(**tensors) -> dict:
    """{"stride_qb": ..., "stride_qh": ..., "stride_qn": ...} for q=..., etc. (the last dim is contiguous)."""
    return {f"stride_{name}{dim}": t.stride(i) for name, t in tensors.items() for i, dim in enumerate("bhn")}


def _flash_forward(q, k, v, lengths, alibi_slopes, sink_logits, cu_seqlens, causal, window, sink_tokens, softcap,
                   scale, config=None, launch=_launch):
    """Returns out `[B, Hq, N, D]` and lse `[B, Hq, N]` (fp32, log2 units). lengths: `_lengths(...)`.
    config: `launch_config(...)` (default: the tensor's device's); launch: `launch(kernel, grid, *args, **kwargs)`
    (the ahead-of-time compiler records the launch instead of running it)."""
    b, hq, n, _ = q.shape
    q_lens, k_lens = lengths
    cfg = (config or _launch_config(q))["fwd"]
    table = key_block_ranges(q_lens, k_lens, cfg["BLOCK_M"], cfg["BLOCK_N"], causal=causal, window=window,
                             sink_tokens=sink_tokens).to(q.device)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, n, device=q.device, dtype=torch.float32)
    num_seqs = len(q_lens) if cu_seqlens is not None else b
    grid = (table.shape[1], num_seqs * hq)
    launch(_fwd_kernel, grid, q, k, v, out, lse, SINKS=q if sink_logits is None else sink_logits.contiguous(),
           KV_BLOCKS=table, **_strides(q=q, k=k, v=v, o=out), num_heads=hq, num_q_blocks=table.shape[1],
           HAS_SINK_LOGITS=sink_logits is not None,
           **_common_args(q, k, v, cu_seqlens, causal, window, sink_tokens, alibi_slopes, softcap, scale), **cfg)
    return out, lse


def _flash_backward(do, q, k, v, out, lse, lengths, alibi_slopes, cu_seqlens, causal, window, sink_tokens, softcap,
                    scale, config=None, launch=_launch):
    """Returns dq, dk, dv (laid out like q, k, v) and delta = rowsum(dO * O) `[B, Hq, N]` fp32.
    config, launch: as for `_flash_forward`."""
    b, hq, n, _ = q.shape
    hkv = k.shape[1]
    q_lens, k_lens = lengths
    cfg = config or _launch_config(q)
    num_seqs = len(q_lens) if cu_seqlens is not None else b
    delta = (do.float() * out.float()).sum(-1)
    common = _common_args(q, k, v, cu_seqlens, causal, window, sink_tokens, alibi_slopes, softcap, scale)
    masks = dict(causal=causal, window=window, sink_tokens=sink_tokens)
    dq, dk, dv = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in (q, k, v))

    c = cfg["dq"]
    kv_table = key_block_ranges(q_lens, k_lens, c["BLOCK_M"], c["BLOCK_N"], **masks).to(q.device)
    launch(_bwd_dq_kernel, (kv_table.shape[1], num_seqs * hq),
        q, k, v, do, dq, lse, delta, KV_BLOCKS=kv_table, **_strides(q=q, k=k, v=v, do=do), num_heads=hq,
        num_q_blocks=kv_table.shape[1], sm_scale=scale, **common, **c)

    c = cfg["dkdv"]
    q_table = query_block_ranges(q_lens, k_lens, c["BLOCK_M"], c["BLOCK_N"], **masks).to(q.device)
    launch(_bwd_dkdv_kernel, (q_table.shape[1], num_seqs * hkv),
        q, k, v, do, dk, dv, lse, delta, Q_BLOCKS=q_table, **_strides(q=q, k=k, v=v, do=do), num_heads=hq,
        num_kv_heads=hkv, num_k_blocks=q_table.shape[1], sm_scale=scale, **common, **c)
    return dq, dk, dv, delta


def _configs(fwd, dq, dkdv) -> dict[str, dict]:
    names = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    return dict(fwd=dict(zip(names, fwd)), dq=dict(zip(names, dq)), dkdv=dict(zip(names, dkdv)))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; BLOCK_M counts query rows, BLOCK_N keys. Compiled in bf16
# for every mask variant, the softcap variant (tanh and its derivative kept live) needs the most registers. The
# forward never spills; the backward spills nothing except dk/dv at D = 64 on sm_80 (36 B per thread with a
# softcap, 4 B with a window or ALiBi: within the 80 B that Triton's tutorial backward spills there; with the
# tutorial's own 32 x 128 dk/dv tiles this kernel spilled 80-716 B).
LAUNCH_CONFIGS.update({
    # A100: 8 warps instead of 4 for the D = 64 forward; 32 keys per block for the D = 128 forward; the D = 64 dq
    # visits 32 keys per step; dk/dv keeps 64 keys per program (not 128) on 8 warps.
    (80, 64): _configs(fwd=(128, 64, 8, 3), dq=(64, 32, 4, 2), dkdv=(32, 64, 8, 2)),
    (80, 128): _configs(fwd=(128, 32, 8, 3), dq=(64, 64, 8, 2), dkdv=(32, 64, 8, 2)),
    # H100/H200: the same tiles as before but 8 warps for the D = 64 forward and the D = 128 backward.
    (90, 64): _configs(fwd=(128, 64, 8, 3), dq=(64, 64, 4, 2), dkdv=(32, 128, 8, 2)),
    (90, 128): _configs(fwd=(128, 64, 8, 3), dq=(64, 64, 8, 2), dkdv=(32, 64, 8, 2)),
})


# ----------------------------------------------------------------------------------- autograd.Function


class FlashAttentionFunction(torch.autograd.Function):
    """Triton flash attention; differentiable in q, k, v and sink_logits (not in alibi_slopes)."""

    @staticmethod
    def forward(ctx, q, k, v, sink_logits, alibi_slopes, cu_seqlens, causal, window, sink_tokens, softcap, scale):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        # Host-side sequence lengths (a device-to-host copy of cu_seqlens), shared with the backward.
        ctx.lengths = _lengths(cu_seqlens, q.shape[2], k.shape[2])
        out, lse = _flash_forward(q, k, v, ctx.lengths, alibi_slopes, sink_logits, cu_seqlens, causal, window,
                                  sink_tokens, softcap, scale)
        ctx.save_for_backward(q, k, v, out, lse, sink_logits, alibi_slopes, cu_seqlens)
        ctx.options = (causal, window, sink_tokens, softcap, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, sink_logits, alibi_slopes, cu_seqlens = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv, delta = _flash_backward(do, q, k, v, out, lse, ctx.lengths, alibi_slopes, cu_seqlens,
                                            *ctx.options)
        d_sink = None
        if sink_logits is not None and ctx.needs_input_grad[3]:
            # d sink_h = -sum over rows of p_sink * delta, with p_sink = exp(sink_h - lse).
            p_sink = torch.exp2(sink_logits.float()[None, :, None] * LOG2E.value - lse)
            d_sink = -(p_sink * delta).sum(dim=(0, 2)).to(sink_logits.dtype)
        return dq, dk, dv, d_sink, None, None, None, None, None, None, None


# -------------------------------------------------------------------------------------- public API

BACKENDS = ("auto", "triton", "blocked", "reference")


def flash_attention(q, k, v, *, causal=True, window=None, sink_tokens=0, alibi_slopes=None, sink_logits=None,
                    softcap=None, cu_seqlens=None, position_ids=None, scale=None, backend="auto"):
    """Memory-efficient softmax attention with sliding windows, sinks, ALiBi, logit softcaps and packed documents.

    Args:
        q: `[B, Hq, N, D]` queries; fp32, fp16 or bf16. D up to 128 for Triton (32, 64, 96, 128
            tested; others are padded to a power of two inside the kernel).
        k, v: `[B, Hkv, M, D]`, same dtype. Hq must be a multiple of Hkv (GQA / MQA); each
            group of Hq // Hkv consecutive query heads shares one key/value head, and K/V are
            never repeated in memory.
        causal: query i sees keys j <= i. Positions are bottom-right aligned: query row r sits
            at position M - N + r (decode, chunked prefill with N < M). causal with N > M would
            leave rows with no key and raises ValueError.
        window: sliding window W >= 1 (needs causal): query i sees keys j with i - W < j <= i,
            W keys including itself (transformers' `sliding_window`). None: no window.
        sink_tokens: S >= 0; with a window, keys 0..S-1 stay visible to every query (still
            causal) on top of the window (StreamingLLM). Without a window every key is already
            visible and S has no effect.
        alibi_slopes: `[Hq]` fp32; adds -slope_h * |i - j| to the scaled (and capped) scores (i, j positions).
            Not materialised; not differentiated.
        sink_logits: `[Hq]`; one learnable logit per head (in scaled-score units) joins the
            softmax denominator: softmax over [scores, sink_h] with the sink column carrying no
            value (gpt-oss). Never capped by softcap. Differentiable.
        softcap: attention-logit softcap c > 0 (Gemma 2's `attn_logit_softcapping`), or None.
            In the order of transformers' Gemma 2 `eager_attention_forward`: the scores
            s = q·k^T·scale become c·tanh(s / c), THEN the ALiBi bias and the mask are added,
            then the softmax (with the sink column) is taken. The backward recomputes tanh
            from the raw scores: d s = d capped · (1 - tanh²(s / c)).
        cu_seqlens: int32 `[num_docs + 1]`, 0 = cu[0] <= ... <= cu[-1] = N; packed documents
            (B == 1, N == M). No attention crosses a document boundary, and positions (for
            causal, window, sinks, ALiBi) restart at 0 in every document.
        position_ids: `[1, N]` alternative to cu_seqlens, as transformers'
            DataCollatorWithFlattening produces: a document starts wherever the position is 0,
            and positions count up by one inside it.
        scale: score scale; default 1 / sqrt(D).
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "blocked" (pure-torch
            O(N·W) CPU path), "reference" (dense, for tests) or "auto": triton on CUDA,
            blocked otherwise.

    Every query sees at least itself (causal) or every key of its document, so no row is
    fully masked. The Triton kernel visits only key blocks that hold a visible pair: with a
    window it costs O(N·(W + S)) instead of O(N·M).

    Returns:
        `[B, Hq, N, D]` in q's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    options = dict(causal=causal, window=window, sink_tokens=sink_tokens, alibi_slopes=alibi_slopes,
                   sink_logits=sink_logits, softcap=softcap)
    if backend == "reference":
        return flash_attention_reference(q, k, v, cu_seqlens=cu_seqlens, position_ids=position_ids, scale=scale,
                                         **options)
    cu_seqlens, scale = check_inputs(q, k, v, cu_seqlens=cu_seqlens, position_ids=position_ids, scale=scale,
                                     **options)
    if backend == "blocked" or (backend == "auto" and not q.is_cuda):
        return blocked_attention(q, k, v, cu_seqlens=cu_seqlens, scale=scale, **options)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or q.shape[-1] > 128:
        raise ValueError(f"backend='triton' supports fp32/fp16/bf16 and head dim <= 128, got {q.dtype} and "
                         f"D={q.shape[-1]}")
    return FlashAttentionFunction.apply(q, k, v, sink_logits, alibi_slopes, cu_seqlens, causal, window, sink_tokens,
                                        softcap, scale)
