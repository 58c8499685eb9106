"""Attention with remapped relative positions, in O(T) memory, from already rotated queries and keys.

Rotating a rotary-embedded vector (rotated at position p) by ``delta * inv_freq`` on every
frequency pair gives the vector rotated at ``p + delta`` (rotations of one plane compose by adding
angles; any ``attention_scaling`` of cos/sin is a common factor that the extra rotation leaves
alone). So a pass of a rule (:mod:`.rules`) re-rotates the queries and the keys it needs to their
new positions and runs ordinary softmax attention over the keys it owns; the passes of a rule own
disjoint sets of keys, so their outputs merge exactly by their log-sum-exps:

    out = sum_p exp(lse_p - lse) * out_p,   lse = log sum_p exp(lse_p).

Prefill (many queries) runs each pass in blocks of ``BLOCK_SIZE`` query rows over only the keys the
block's rows own (the neighbor and intra-chunk passes see a band of keys, the others a prefix),
with torch's fused CPU flash kernel, which returns the log-sum-exp (elsewhere matmul + softmax per block): memory is
O(BLOCK_SIZE x T) per call, never T x T. A few queries (a decode step) take one pass: the scores
of every key, each computed at its own pass's positions, in one softmax.

Positions. Queries take theirs from ``position_ids``; a key's position follows from its index:
key ``j`` sits ``M - 1 - j`` places before the last query. That is exact for a plain or
chunked prefill, cached decoding and left-padded batches (the pads sit left of every token and
are masked by ``key_valid``); the attention function refuses inputs whose positions are not
consecutive (packed documents).
"""

from __future__ import annotations

import torch

from .rules import Pass

# Queries x keys below which the single-pass form (materialised scores) is used: a decode step, a short chunk.
_SINGLE_PASS_ELEMENTS = 1 << 22
BLOCK_SIZE = 512  # query rows per call of the blocked form


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


def _merge(out, lse, part_out, part_lse):
    """Merge two softmax attentions over disjoint keys by their log-sum-exps (-inf: no key)."""
    top = torch.maximum(lse, part_lse)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w, w_part = torch.exp(lse - top), torch.exp(part_lse - top)
    total = w + w_part
    merged = (out * w[..., None] + part_out * w_part[..., None]) / torch.where(total > 0, total, 1)[..., None]
    return merged, top + torch.log(total)


def _owned(rule: Pass, q_pos, k_pos, key_valid):
    """Boolean ``[B, 1, n, m]``: the keys (positions ``k_pos [B, m]``) that this pass owns for each query."""
    lo, hi = rule.keys(q_pos)
    kp = k_pos[:, None, :]
    mask = (kp >= lo[..., None]) & (kp <= hi[..., None])
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    return mask[:, None]


def _attend_with_lse(q, k, v, bias, scaling):
    """(out ``[B, H, n, D]``, log-sum-exp ``[B, H, n]``) of q over k/v with an additive ``bias``; torch's fused
    flash kernel on the CPU, matmul + softmax elsewhere (one block of rows: O(n x m))."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                         scale=scaling)[:2]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling + bias
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse)[..., None]).to(v.dtype)
    return torch.matmul(probs, v), lse.to(q.dtype)


def _blocked(query, key, value, q_pos, k_pos, key_valid, rules, inv_freq, scaling, block_size):
    b, hq, n, d = query.shape
    groups = hq // key.shape[1]
    out = query.new_zeros(b, hq, n, d)
    lse = query.new_full((b, hq, n), float("-inf"))
    first_key = k_pos[:, :1]  # index of position p in row b: p - first_key[b]
    for rule in rules:
        q_rule = _moved(query, q_pos, rule.query, inv_freq)
        k_rule = _expand_heads(_moved(key, k_pos, rule.key, inv_freq), groups)
        v_rule = _expand_heads(value, groups)
        for r0 in range(0, n, block_size):
            r1 = min(n, r0 + block_size)
            lo, hi = rule.keys(q_pos[:, r0:r1])
            start = max(0, int((lo - first_key).min()))
            end = min(key.shape[2], int((hi - first_key).max()) + 1)
            if end <= start:
                continue
            mask = _owned(rule, q_pos[:, r0:r1], k_pos[:, start:end], None if key_valid is None
                          else key_valid[:, start:end])
            bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, float("-inf"))
            part, part_lse = _attend_with_lse(q_rule[:, :, r0:r1], k_rule[:, :, start:end], v_rule[:, :, start:end],
                                              bias, scaling)
            part_lse = part_lse.masked_fill(~mask.any(-1), float("-inf"))  # the kernel gives 0 for rows without keys
            out[:, :, r0:r1], lse[:, :, r0:r1] = _merge(out[:, :, r0:r1], lse[:, :, r0:r1], part, part_lse)
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


def remapped_attention(query, key, value, q_pos, k_pos, key_valid, rules, inv_freq, *, scaling: float) -> torch.Tensor:
    """Softmax attention where each key is scored at the positions of the pass that owns it.

    query ``[B, Hq, N, D]`` rotated at ``q_pos`` ``[B, N]``; key/value ``[B, Hkv, M, D]``, keys rotated at
    ``k_pos`` ``[B, M]``; ``key_valid`` bool ``[B, M]`` or None (padding); ``rules`` from
    :func:`~hf_longctx.extend.rules.passes`; ``inv_freq`` ``[R / 2]`` the rotary frequencies.
    Returns ``[B, N, Hq, D]``. A query row that owns no key (a pad) comes out zero.
    """
    n, m = query.shape[2], key.shape[2]
    if n * m <= _SINGLE_PASS_ELEMENTS:
        out = _single_pass(query, key, value, q_pos, k_pos, key_valid, rules, inv_freq, scaling)
    else:
        out = _blocked(query, key, value, q_pos, k_pos, key_valid, rules, inv_freq, scaling, BLOCK_SIZE)
    return out.transpose(1, 2).contiguous()
