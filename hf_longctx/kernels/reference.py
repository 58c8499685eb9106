"""Dense pure-torch attention: the test oracle for the kernels, plus the helpers they share.

`flash_attention_reference` builds the explicit `[N, M]` visibility mask and computes
softmax attention in the dtype of its inputs (float64 included), so the same function
gives the exact answer (float64) and "plain PyTorch in the same precision" (fp16, fp32).
`check_inputs`, `visible` and `attend` are shared with the blocked CPU path and the
Triton launcher so that every backend validates and masks the same way.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["flash_attention_reference", "check_inputs", "visible", "attend", "token_positions"]


def _cu_seqlens_from_position_ids(position_ids: torch.Tensor, n: int) -> torch.Tensor:
    """`[1, N]` positions that restart at 0 per document (DataCollatorWithFlattening) -> cu_seqlens."""
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.shape != (n,):
        raise ValueError(f"position_ids must have shape [1, N] = [1, {n}], got {list(position_ids.shape)}")
    pos = position_ids.to(torch.int64)
    if pos[0].item() != 0:
        raise ValueError(f"position_ids must start at 0 (a document start), got {pos[0].item()}")
    restarts = pos[1:] == 0
    if not bool(torch.all(restarts | (pos[1:] == pos[:-1] + 1))):
        raise ValueError("position_ids must count up by one inside each document and restart at 0 at each "
                         "document start, as DataCollatorWithFlattening produces")
    starts = torch.nonzero(restarts).flatten() + 1
    bounds = torch.cat([pos.new_zeros(1), starts, pos.new_full((1,), n)])
    return bounds.to(torch.int32)


def check_inputs(q, k, v, *, causal, window, sink_tokens, alibi_slopes, sink_logits, softcap, cu_seqlens,
                 position_ids, scale) -> tuple[torch.Tensor | None, float]:
    """Validate the arguments of `flash_attention`; return `(cu_seqlens or None, scale)`.

    Raises ValueError naming the offending value and what is accepted. `position_ids` is
    converted into the equivalent int32 `cu_seqlens` on q's device.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, N, D]; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    (b, hq, n, d), (bk, hkv, m, dk) = q.shape, k.shape
    if b != bk or d != dk:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} must agree on batch and head dim")
    if hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of key/value heads "
                         f"({hkv}) for GQA/MQA")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if causal and n > m:
        raise ValueError(f"causal attention with more queries ({n}) than keys ({m}) would leave the first "
                         f"{n - m} query rows without any visible key; queries are bottom-right aligned, so "
                         "pass N <= M")
    if window is not None:
        if not causal:
            raise ValueError("window (sliding-window attention) needs causal=True")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 (keys visible per query, itself included), got {window!r}")
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be a finite number > 0 (Gemma 2's attn_logit_softcapping) or None, got "
                         f"{softcap!r}")
    for name, t in (("alibi_slopes", alibi_slopes), ("sink_logits", sink_logits)):
        if t is not None and tuple(t.shape) != (hq,):
            raise ValueError(f"{name} must have shape [Hq] = [{hq}], got {list(t.shape)}")
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError("pass either cu_seqlens or position_ids to describe packed documents, not both")
    if cu_seqlens is None and position_ids is None:
        return None, (1.0 / math.sqrt(d) if scale is None else float(scale))
    if b != 1 or n != m:
        raise ValueError(f"packed documents (cu_seqlens / position_ids) need B == 1 and N == M, got B={b}, N={n}, "
                         f"M={m}")
    if position_ids is not None:
        cu_seqlens = _cu_seqlens_from_position_ids(position_ids.to(q.device), n)
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [num_docs + 1], got {cu_seqlens.dtype} "
                         f"{list(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != n or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to N={n} without decreasing, got {bounds}")
    return cu_seqlens.to(device=q.device, dtype=torch.int32), (1.0 / math.sqrt(d) if scale is None else float(scale))


def token_positions(n: int, m: int, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, ...]:
    """Positions and document ids `(q_pos [N], q_doc [N], k_pos [M], k_doc [M])`, int64.

    Queries are bottom-right aligned (row r sits at position M - N + r); with `cu_seqlens`
    (N == M) positions restart at 0 at every document start.
    """
    k_idx = torch.arange(m, device=device)
    if cu_seqlens is None:
        k_doc = torch.zeros(m, dtype=torch.int64, device=device)
        return torch.arange(m - n, m, device=device), k_doc.new_zeros(n), k_idx, k_doc
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    doc = torch.searchsorted(cu, k_idx, right=True) - 1
    pos = k_idx - cu[doc]
    return pos, doc, pos, doc


def visible(q_pos, k_pos, *, causal: bool, window: int | None, sink_tokens: int, q_doc=None, k_doc=None):
    """Boolean `[n, m]`: may query (position q_pos[i]) attend to key (position k_pos[j])?

    causal: k <= q. window W: q - W < k, except sink keys k < sink_tokens, which stay
    visible (still causal). q_doc/k_doc: keys of another document are never visible.
    """
    qp, kp = q_pos[:, None], k_pos[None, :]
    ok = kp <= qp if causal else torch.ones(qp.shape[0], kp.shape[1], dtype=torch.bool, device=qp.device)
    if window is not None:
        ok = ok & ((kp > qp - window) | (kp < sink_tokens))
    if q_doc is not None:
        ok = ok & (q_doc[:, None] == k_doc[None, :])
    return ok


def attend(q, k, v, mask, q_pos, k_pos, alibi_slopes, sink_logits, scale, softcap):
    """Softmax attention of q `[B, Hq, n, D]` over k/v `[B, Hkv, m, D]` in q's dtype.

    mask `[n, m]` bool (True = visible) or None. In order, as Gemma 2's eager attention: the
    scores q·k^T·scale are capped to softcap·tanh(scores / softcap) (if softcap), ALiBi adds
    -slope_h * |q_pos - k_pos|, the mask applies; sink_logits `[Hq]` (never capped) joins the
    softmax denominator as a column without value.
    The query heads of a GQA group are folded into the row dimension so K/V are never repeated.
    Every row must see at least one key (callers guarantee it), else it comes out NaN.
    """
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    g = hq // hkv
    scores = torch.matmul(q.reshape(b, hkv, g * n, d), k.transpose(-1, -2)).view(b, hkv, g, n, m) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        distance = (q_pos[:, None] - k_pos[None, :]).abs().to(q.dtype)
        scores = scores - alibi_slopes.to(q.dtype).view(1, hkv, g, 1, 1) * distance
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sink_logits is not None:
        sink_column = sink_logits.to(q.dtype).view(1, hkv, g, 1, 1).expand(b, hkv, g, n, 1)
        probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[..., :m]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.reshape(b, hkv, g * n, m), v).view(b, hq, n, d)


def flash_attention_reference(q, k, v, *, causal=True, window=None, sink_tokens=0, alibi_slopes=None,
                              sink_logits=None, softcap=None, cu_seqlens=None, position_ids=None, scale=None):
    """Dense reference for `hf_longctx.kernels.flash_attention` (same arguments and semantics).

    Materialises the `[N, M]` mask and `[B, Hq, N, M]` scores: O(N·M) memory, for tests and
    tiny inputs. Computes in the inputs' dtype; pass float64 for an exact oracle.
    """
    cu_seqlens, scale = check_inputs(q, k, v, causal=causal, window=window, sink_tokens=sink_tokens,
                                     alibi_slopes=alibi_slopes, sink_logits=sink_logits, softcap=softcap,
                                     cu_seqlens=cu_seqlens, position_ids=position_ids, scale=scale)
    n, m = q.shape[2], k.shape[2]
    q_pos, q_doc, k_pos, k_doc = token_positions(n, m, cu_seqlens, q.device)
    mask = visible(q_pos, k_pos, causal=causal, window=window, sink_tokens=sink_tokens, q_doc=q_doc, k_doc=k_doc)
    return attend(q, k, v, mask, q_pos, k_pos, alibi_slopes, sink_logits, scale, softcap)
