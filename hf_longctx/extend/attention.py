"""Attention with remapped relative positions, in O(T) memory, from already rotated queries and keys.

Rotating a rotary-embedded vector (rotated at position p) by ``delta * inv_freq`` on every
frequency pair gives the vector rotated at ``p + delta`` (rotations of one plane compose by adding
angles; any ``attention_scaling`` of cos/sin is a common factor that the extra rotation leaves
alone). So a pass of a rule (:mod:`.rules`) re-rotates the queries and the keys it needs to their
new positions and runs ordinary softmax attention over the keys it owns; the passes of a rule own
disjoint sets of keys, so their outputs merge exactly by their log-sum-exps:

    out = sum_p exp(lse_p - lse) * out_p,   lse = log sum_p exp(lse_p).

Prefill (many queries) runs each pass in blocks of ``BLOCK_SIZE`` query rows over only the keys the
block's rows own, with torch's fused CPU flash kernel, which returns the log-sum-exp (elsewhere
matmul + softmax per block), in tiles: keys every row of the block owns go unmasked, the edges of a
window or of the causal diagonal as causal (or reversed causal) squares, which the kernel computes
without a mask; only irregular edges (padding, a chunk boundary inside a block) carry a mask.
Memory is O(BLOCK_SIZE x T) per call, never T x T. Self-Extend's plain prefill (no padding, N == M)
needs no blocks at all: the neighbor pass is a sliding window (blocks of W rows folded into the
batch: two calls) and the grouped pass one causal call of the queries from row W on over the keys
up to N - W. One query per row (a decode step) owns one interval of keys in each pass: the pass
re-rotates only that slice and runs the flash kernel over it without a mask (every key is rotated at
most once, no ``[heads, keys]`` copy of the cache is made), and the passes merge by their log-sum-exps;
a decode step costs a few times plain attention instead of some 30 times (a materialised score row of
every head over every key, masked per pass). Other short inputs (a few queries, a short chunk) take
one pass: the scores of every key, each computed at its own pass's positions, in one softmax.

On CUDA (and on the CPU under Triton's interpreter when ``FUSED`` is set) every pass runs through the
project's Triton flash kernel, which returns the log-sum-exp (:func:`_fused`): no ``[rows, keys]`` score
matrix is built. A pass's owned key interval ``[lo(i), hi(i)]`` is cut into runs of query rows where each
end is constant or moves by one key per row, and each run is one kernel call over a slice of the keys:
``hi`` moving and ``lo`` constant is a causal call, both moving a causal call with a window, both constant a
call without a mask, ``lo`` moving and ``hi`` constant a causal call on the rows and keys read backwards. A
decode step is one run per pass; Self-Extend's prefill is about two runs per pass, Dual Chunk's three per
chunk. Padded batches go row by row (the pads cut off), GQA as it is (the kernel takes fewer key/value heads).
Memory is the kernel's: O(block) per program, nothing of size rows x keys. With gradients enabled on the
queries (fine-tuning through ``extend``; the kernel's forward is not differentiated here), or head dims
above 128, the torch path below runs instead.

Positions. Queries take theirs from ``position_ids``; a key's position follows from its index:
key ``j`` sits ``M - 1 - j`` places before the last query. That is exact for a plain or
chunked prefill, cached decoding and left-padded batches (the pads sit left of every token and
are masked by ``key_valid``); the attention function refuses inputs whose positions are not
consecutive (packed documents).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .rules import Pass

# Run the passes through the Triton kernel: on CUDA tensors (None: whenever they are on CUDA), or forced (True, on
# the CPU under TRITON_INTERPRET=1, for tests) or off (False).
FUSED: bool | None = None
# Queries x keys below which the single-pass form (materialised scores) is used: a decode step, a short chunk.
_SINGLE_PASS_ELEMENTS = 1 << 22
BLOCK_SIZE = 512  # query rows per call of the blocked form
BAND_AND_LAG = True  # Self-Extend's prefill as a sliding window and one causal call (else the blocked form)
SLICED_DECODE = True  # one query per row off the kernel path: each pass over its slice of the keys (else single pass)


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate the rotary dims of ``x`` ``[B, H, L, D]`` by ``delta`` ``[B, L]`` positions (transformers' half-split
    layout: pair ``(d, d + R/2)`` turns by ``inv_freq[d]``; the first ``R = 2 len(inv_freq)`` dims rotate)."""
    rot = 2 * inv_freq.shape[0]
    angles = delta[:, None, :, None].to(torch.float32) * inv_freq.to(device=x.device, dtype=torch.float32)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., : rot // 2], x[..., rot // 2 : rot], x[..., rot:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def _moved(x, positions, new_positions, inv_freq):
    return x if new_positions is None else rotate(x, new_positions(positions) - positions, inv_freq)


def _expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _attend_with_lse(q, k, v, bias, scaling, causal=False):
    """(out ``[B, H, n, D]``, log-sum-exp ``[B, H, n]``) of q over k/v with an additive ``bias`` (or ``causal``:
    row r sees keys 0..r of a square tile); torch's fused flash kernel on the CPU (it skips the tiles a causal
    mask hides), matmul + softmax elsewhere (one block of rows: O(n x m))."""
    if q.device.type == "cpu":  # GQA as it is: the kernel takes fewer key/value heads
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                         scale=scaling)[:2]
    groups = q.shape[1] // k.shape[1]
    k, v = _expand_heads(k, groups), _expand_heads(v, groups)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    elif bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse)[..., None]).to(v.dtype)
    return torch.matmul(probs, v), lse.to(q.dtype)


def _attend_tile(q, k, v, kind, bias, scaling):
    """One tile of a pass: ``full`` (every key), ``causal`` (square, row r owns keys 0..r), ``anticausal``
    (square, row r owns keys r..n-1: the causal tile read backwards) or ``masked`` (``bias``)."""
    if kind == "anticausal":
        out, lse = _attend_with_lse(q.flip(2), k.flip(2), v.flip(2), None, scaling, causal=True)
        return out.flip(2), lse.flip(2)
    return _attend_with_lse(q, k, v, bias, scaling, causal=kind == "causal")


def _owned(rule: Pass, q_pos, k_pos, key_valid):
    """Boolean ``[B, 1, n, m]``: the keys (positions ``k_pos [B, m]``) that this pass owns for each query."""
    lo, hi = rule.keys(q_pos)
    kp = k_pos[:, None, :]
    mask = (kp >= lo[..., None]) & (kp <= hi[..., None])
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    return mask[:, None]


def _steps_by_one(x: np.ndarray) -> bool:
    """Whether every row of ``x`` ``[B, n]`` is the same ``x0, x0 + 1, ..., x0 + n - 1`` with ``x0 >= 0``."""
    return bool(x[0, 0] >= 0 and (x == x[0, 0] + np.arange(x.shape[1])).all())


def _key_spans(lo: np.ndarray, hi: np.ndarray, num_keys: int, valid: np.ndarray | None):
    """Tiles ``(start, end, kind)`` that hold every key a block of query rows owns, from the rows' inclusive
    owned ranges ``lo``/``hi`` ``[B, n]`` (key indices, nondecreasing down the rows).

    Keys every row owns go as one ``full`` tile; the edges, where the rows' ranges begin and end, as a
    ``causal`` / ``anticausal`` square when the range moves by one key per row (a window, a causal diagonal),
    else ``masked``. Padding (``valid`` ``[B, M]`` with a False) makes every tile ``masked``.
    """
    start, end = max(0, int(lo.min())), min(num_keys, int(hi.max()) + 1)
    if end <= start:
        return []
    left_end = min(max(start, int(lo.max()) + 1), end)
    right_start = min(max(left_end, int(hi.min())), end)
    padded = valid is not None and not valid[:, start:end].all()
    n = lo.shape[1]
    left = "anticausal" if left_end - start == n and _steps_by_one(lo) else "masked"
    right = "causal" if end - right_start == n and _steps_by_one(hi) and int(lo.max()) <= right_start else "masked"
    if padded or int(lo.max()) >= int(hi.min()):  # a block wider than the rows' ranges: no key owned by all
        return [(start, end, "masked")]
    spans = [(start, left_end, left if int(lo.min()) >= 0 else "masked"), (left_end, right_start, "full"),
             (right_start, end, right)]
    return [span for span in spans if span[1] > span[0]]


def _blocked(query, key, value, q_pos, k_pos, key_valid, rules, inv_freq, scaling, block_size):
    """The passes in blocks of query rows. The owned key ranges and the edge masks are computed with numpy:
    many small torch calls cost more than their work on a busy CPU, where each waits for its threads."""
    b, hq, n, d = query.shape
    num_keys = key.shape[2]
    first_key = k_pos[:, :1]  # index of position p in row b: p - first_key[b]
    valid = None if key_valid is None else key_valid.cpu().numpy()
    prepared = []
    for rule in rules:
        lo, hi = rule.keys(q_pos)
        prepared.append((_moved(query, q_pos, rule.query, inv_freq),
                         _moved(key, k_pos, rule.key, inv_freq),
                         (lo - first_key).cpu().numpy(), (hi - first_key).cpu().numpy()))
    v_all = value
    keys = np.arange(num_keys)
    out = query.new_empty(b, hq, n, d)
    for r0 in range(0, n, block_size):
        rows = slice(r0, min(n, r0 + block_size))
        parts = []
        for q_rule, k_rule, lo_all, hi_all in prepared:
            lo, hi = lo_all[:, rows], hi_all[:, rows]
            for k0, k1, kind in _key_spans(lo, hi, num_keys, valid):
                bias, empty = None, None
                if kind == "masked":
                    mask = (keys[None, None, k0:k1] >= lo[..., None]) & (keys[None, None, k0:k1] <= hi[..., None])
                    if valid is not None:
                        mask &= valid[:, None, k0:k1]
                    bias = torch.from_numpy(np.where(mask, 0.0, -np.inf).astype(np.float32))[:, None]
                    bias = bias.to(device=query.device, dtype=query.dtype)
                    empty = ~mask.any(-1)
                part, part_lse = _attend_tile(q_rule[:, :, rows], k_rule[:, :, k0:k1], v_all[:, :, k0:k1], kind, bias,
                                              scaling)
                if empty is not None and empty.any():  # the kernel gives 0 for rows without keys
                    part_lse = part_lse.masked_fill(torch.from_numpy(empty).to(query.device)[:, None], float("-inf"))
                parts.append((part, part_lse))
        if len(parts) == 1:
            out[:, :, rows] = parts[0][0]
            continue
        lses = torch.stack([part_lse for _, part_lse in parts])
        weights = torch.exp(lses - torch.logsumexp(lses, dim=0)).nan_to_num_(0.0)  # a row without keys: zeros
        out[:, :, rows] = (torch.stack([part for part, _ in parts]) * weights[..., None]).sum(0)
    return out


def _fold(x, first: int, count: int, size: int):
    """Blocks ``first .. first + count - 1`` of ``size`` tokens of x ``[B, H, L, ...]`` -> ``[B·count, H, size, ...]``."""
    return x[:, :, first * size:(first + count) * size].unflatten(2, (count, size)).transpose(1, 2).flatten(0, 1)


def _unfold(x, batch: int):
    """Inverse of :func:`_fold`: ``[B·count, H, size, ...]`` -> ``[B, H, count·size, ...]``."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2).flatten(2, 3)


def _merge_into(out, lse, rows: slice, part, part_lse):
    """Merge a softmax attention over other keys into rows of ``out``/``lse``, whose log-sum-exps are finite."""
    top = torch.maximum(lse[:, :, rows], part_lse)
    w, w_part = torch.exp(lse[:, :, rows] - top), torch.exp(part_lse - top)
    total = w + w_part
    out[:, :, rows] = (out[:, :, rows] * w[..., None] + part * w_part[..., None]) / total[..., None]
    lse[:, :, rows] = top + torch.log(total)


def _band(q, k, v, width: int, scaling):
    """Sliding-window attention (row i owns keys i - width < j <= i) with its log-sum-exp, for N == M.

    Rows go in blocks of ``width``: each block sees its own keys causally (one call for all full blocks,
    folded into the batch) and the keys of the block before it above the diagonal (one call, one shared
    mask)."""
    b, _, n, _ = q.shape
    full, rest = divmod(n, width)
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3])
    if full:
        part, part_lse = _attend_with_lse(*(_fold(x, 0, full, width) for x in (q, k, v)), None, scaling, causal=True)
        out[:, :, :full * width], lse[:, :, :full * width] = _unfold(part, b), _unfold(part_lse, b)
    if rest:
        tail = slice(full * width, n)
        out[:, :, tail], lse[:, :, tail] = _attend_with_lse(q[:, :, tail], k[:, :, tail], v[:, :, tail], None,
                                                            scaling, causal=True)
    if full == 0 or n <= width:
        return out, lse
    above = torch.ones(width, width, dtype=torch.bool, device=q.device).triu(1)  # row r owns key c of the block before: c > r
    bias = torch.zeros(width, width, dtype=q.dtype, device=q.device).masked_fill_(~above, float("-inf"))[None, None]
    if full > 1:
        part, part_lse = _attend_with_lse(_fold(q, 1, full - 1, width), _fold(k, 0, full - 1, width),
                                          _fold(v, 0, full - 1, width), bias, scaling)
        part_lse[..., -1] = float("-inf")  # the last row of a block owns no key there (the kernel gives 0)
        _merge_into(out, lse, slice(width, full * width), _unfold(part, b), _unfold(part_lse, b))
    if rest:
        keys = slice((full - 1) * width, full * width)
        part, part_lse = _attend_with_lse(q[:, :, full * width:], k[:, :, keys], v[:, :, keys], bias[:, :, :rest],
                                          scaling)
        _merge_into(out, lse, slice(full * width, n), part, part_lse)
    return out, lse


def _band_and_lag(query, key, value, q_pos, rules, inv_freq, scaling):
    """Self-Extend's prefill (N == M, no padding, the same positions in every row): the neighbor pass as a
    sliding window (:func:`_band`), the grouped pass as one causal call of the queries from row W on over
    the keys up to N - W, merged by their log-sum-exps."""
    neighbor, grouped = rules
    n = query.shape[2]
    out, lse = _band(_moved(query, q_pos, neighbor.query, inv_freq), _moved(key, q_pos, neighbor.key, inv_freq),
                     value, neighbor.band, scaling)
    lag = grouped.lag
    if n > lag:
        q_far = _moved(query[:, :, lag:], q_pos[:, lag:], grouped.query, inv_freq)
        k_far = _moved(key[:, :, :n - lag], q_pos[:, :n - lag], grouped.key, inv_freq)
        part, part_lse = _attend_with_lse(q_far, k_far, value[:, :, :n - lag], None, scaling, causal=True)
        _merge_into(out, lse, slice(lag, n), part, part_lse)
    return out


def _single_pass(query, key, value, q_pos, k_pos, key_valid, rules, inv_freq, scaling):
    b, hq, n, d = query.shape
    groups = hq // key.shape[1]
    scores = None
    for rule in rules:
        q_rule = _moved(query, q_pos, rule.query, inv_freq)
        k_rule = _expand_heads(_moved(key, k_pos, rule.key, inv_freq), groups)
        part = torch.matmul(q_rule, k_rule.transpose(-1, -2)) * scaling
        owned = _owned(rule, q_pos, k_pos, key_valid)
        scores = torch.where(owned, part, float("-inf") if scores is None else scores)
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(value.dtype)  # a pad row sees no key: zeros
    return torch.matmul(probs, _expand_heads(value, groups))


def _suffix_valid(key_valid) -> list[int] | None:
    """The first valid key of each row when every row's valid keys are one suffix (left padding), else None."""
    if key_valid is None:
        return None
    firsts = []
    for row in key_valid:
        first = int(row.int().argmax()) if bool(row.any()) else row.shape[0]
        if not bool(row[first:].all()):
            return None
        firsts.append(first)
    return firsts


def _sliced_decode(query, key, value, q_pos, k_pos, first_valid, rules, inv_freq, scaling):
    """One query per row: each pass owns keys ``lo .. hi`` (positions), a slice of the cache; only that slice is
    re-rotated, attended without a mask and merged with the other passes by the log-sum-exps."""
    b, hq, _, d = query.shape
    num_keys = key.shape[2]
    out = torch.zeros_like(query)
    for row in range(b):
        first = 0 if first_valid is None else first_valid[row]
        q_row, pos = q_pos[row:row + 1], k_pos[row:row + 1]
        parts = []
        for rule in rules:
            lo, hi = rule.keys(q_row)
            k0 = max(int(lo.max()) - int(pos[0, 0]), first, 0)  # key index = position - first key's position
            k1 = min(int(hi.min()) - int(pos[0, 0]), num_keys - 1) + 1
            if k0 >= k1:
                continue
            q_rule = _moved(query[row:row + 1], q_row, rule.query, inv_freq)
            k_rule = _moved(key[row:row + 1, :, k0:k1], pos[:, k0:k1], rule.key, inv_freq)
            parts.append(_attend_with_lse(q_rule, k_rule, value[row:row + 1, :, k0:k1], None, scaling))
        if not parts:  # a row that owns no key: zeros
            continue
        lse = torch.logsumexp(torch.stack([part_lse.float() for _, part_lse in parts]), dim=0)
        acc = sum(part.float() * torch.exp(part_lse.float() - lse)[..., None] for part, part_lse in parts)
        out[row:row + 1] = acc.to(query.dtype)
    return out


def _runs(lo: np.ndarray, hi: np.ndarray):
    """Runs ``(r0, r1, lo_kind, hi_kind)`` of query rows ``r0 .. r1 - 1`` whose owned key indices ``lo``/``hi``
    ``[n]`` (inclusive, already clipped to the valid keys) each stay constant (``"const"``) or move by one key per
    row (``"diag"``); rows that own no key are left out."""
    n = lo.shape[0]
    runs, r0 = [], 0
    while r0 < n:
        if lo[r0] > hi[r0]:
            r0 += 1
            continue
        r1 = r0 + 1
        kinds = None
        while r1 < n and lo[r1] <= hi[r1]:
            step = (int(lo[r1] - lo[r1 - 1]), int(hi[r1] - hi[r1 - 1]))
            if step[0] not in (0, 1) or step[1] not in (0, 1) or (kinds is not None and step != kinds):
                break
            kinds, r1 = step, r1 + 1
        kinds = kinds or (0, 0)
        runs.append((r0, r1, "diag" if kinds[0] else "const", "diag" if kinds[1] else "const"))
        r0 = r1
    return runs


def _kernel_with_lse(q, k, v, causal: bool, window: int | None, scaling: float):
    """The Triton kernel's forward on ``[1, H, n, D]`` q over ``[1, Hkv, m, D]`` k/v (bottom-right aligned):
    (out, natural log-sum-exp ``[1, H, n]``)."""
    from ..kernels.flash_attention import _flash_forward, _lengths

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # slices as they are (strided)
    out, lse2 = _flash_forward(q, k, v, _lengths(None, q.shape[2], k.shape[2]), None, None, None, causal, window, 0,
                               None, scaling)
    return out, lse2 * math.log(2.0)


def _run_attention(q, k, v, lo, hi, lo_kind, hi_kind, scaling):
    """One run of rows (q ``[1, H, rows, D]``) over the keys it owns (``lo``/``hi``: the run's key indices)."""
    k0, k1 = int(lo.min()), int(hi.max()) + 1
    k, v = k[:, :, k0:k1], v[:, :, k0:k1]
    if hi_kind == "diag":  # row r owns keys up to hi(r): causal over keys ending at the last row's hi
        window = int(hi[0] - lo[0]) + 1 if lo_kind == "diag" else None
        return _kernel_with_lse(q, k, v, True, window, scaling)
    if lo_kind == "const":
        return _kernel_with_lse(q, k, v, False, None, scaling)
    # lo moves, hi constant: row r owns lo(r) .. k1 - 1, the causal form read backwards.
    out, lse = _kernel_with_lse(q.flip(2), k.flip(2), v.flip(2), True, None, scaling)
    return out.flip(2), lse.flip(2)


def _fused(query, key, value, q_pos, k_pos, key_valid, rules, inv_freq, scaling):
    """The passes through the Triton kernel, row of the batch by row, merged by their log-sum-exps."""
    b, hq, n, d = query.shape
    num_keys = key.shape[2]
    first_key = k_pos[:, :1]
    valid = None if key_valid is None else key_valid.cpu().numpy()
    prepared = []
    for rule in rules:
        lo, hi = rule.keys(q_pos)
        prepared.append((_moved(query, q_pos, rule.query, inv_freq), _moved(key, k_pos, rule.key, inv_freq),
                         (lo - first_key).cpu().numpy(), (hi - first_key).cpu().numpy()))
    out = torch.zeros_like(query)
    for row in range(b):
        first = 0 if valid is None else int(np.argmax(valid[row])) if valid[row].any() else num_keys
        parts = []
        for q_rule, k_rule, lo_all, hi_all in prepared:
            lo = np.maximum(lo_all[row], first)  # pads sit left of every token: cut them off
            hi = np.minimum(hi_all[row], num_keys - 1)
            for r0, r1, lo_kind, hi_kind in _runs(lo, hi):
                part, part_lse = _run_attention(q_rule[row:row + 1, :, r0:r1], k_rule[row:row + 1],
                                                value[row:row + 1], lo[r0:r1], hi[r0:r1], lo_kind, hi_kind, scaling)
                parts.append((r0, r1, part, part_lse))
        if not parts:
            continue
        lse = torch.full((1, hq, n), float("-inf"), device=query.device, dtype=torch.float32)
        for r0, r1, _, part_lse in parts:
            lse[:, :, r0:r1] = torch.logaddexp(lse[:, :, r0:r1], part_lse.float())
        acc = torch.zeros(1, hq, n, d, device=query.device, dtype=torch.float32)
        for r0, r1, part, part_lse in parts:
            acc[:, :, r0:r1] += part.float() * torch.exp(part_lse.float() - lse[:, :, r0:r1])[..., None]
        out[row:row + 1] = acc.nan_to_num_(0.0).to(query.dtype)  # a row without keys (a pad): zeros
    return out


def _use_fused(query) -> bool:
    if FUSED is False or query.shape[-1] > 128 or query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and query.requires_grad:  # the kernel's forward has no autograd here
        return False
    return query.is_cuda or FUSED is True


def remapped_attention(query, key, value, q_pos, k_pos, key_valid, rules, inv_freq, *, scaling: float) -> torch.Tensor:
    """Softmax attention where each key is scored at the positions of the pass that owns it.

    query ``[B, Hq, N, D]`` rotated at ``q_pos`` ``[B, N]``; key/value ``[B, Hkv, M, D]``, keys rotated at
    ``k_pos`` ``[B, M]``; ``key_valid`` bool ``[B, M]`` or None (padding); ``rules`` from
    :func:`~hf_longctx.extend.rules.passes`; ``inv_freq`` ``[R / 2]`` the rotary frequencies.
    Returns ``[B, N, Hq, D]``. A query row that owns no key (a pad) comes out zero.
    """
    n, m = query.shape[2], key.shape[2]
    band_and_lag = (len(rules) == 2 and rules[0].band is not None and rules[1].lag is not None and n == m
                    and key_valid is None and bool((q_pos == q_pos[:1]).all()))
    first_valid = None  # read from key_valid only when the sliced decode is the path taken (no syncs elsewhere)
    if _use_fused(query):
        out = _fused(query, key, value, q_pos, k_pos, key_valid, rules, inv_freq, scaling)
    elif (n == 1 and SLICED_DECODE and not (torch.is_grad_enabled() and query.requires_grad)
          and (key_valid is None or (first_valid := _suffix_valid(key_valid)) is not None)):
        out = _sliced_decode(query, key, value, q_pos, k_pos, first_valid, rules, inv_freq, scaling)
    elif n * m <= _SINGLE_PASS_ELEMENTS:
        out = _single_pass(query, key, value, q_pos, k_pos, key_valid, rules, inv_freq, scaling)
    elif band_and_lag and BAND_AND_LAG:
        out = _band_and_lag(query, key, value, q_pos, rules, inv_freq, scaling)
    else:
        out = _blocked(query, key, value, q_pos, k_pos, key_valid, rules, inv_freq, scaling, BLOCK_SIZE)
    return out.transpose(1, 2).contiguous()
