"""Top-k routing and grouped expert dispatch, in plain PyTorch (no transformers import).

Tokens are never looped over in Python. Every (token, expert) assignment is sorted by
expert, so that the rows of each expert are contiguous; then each projection of all
experts is one grouped matrix multiply over the sorted rows (``torch.nn.functional.grouped_mm``
or ``torch._grouped_mm``; a padded ``torch.bmm`` where neither runs on the device), and
the weighted expert outputs are added back to their tokens with one ``index_add``.

Expert weights use transformers' layout for MoE experts (Mixtral, Qwen2-MoE): the input
projection ``[E, N, H]`` (for gated MLPs ``N = 2 I``, the gate rows first, then the up rows),
the output projection ``[E, H, I]``.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "grouped_mm", "bmm"]

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing with renormalised weights (Mixtral's router).

    ``router_logits`` ``[T, E]`` -> (weights ``[T, k]`` float32, summing to 1 per token;
    expert indices ``[T, k]`` int64). The softmax runs in float32 whatever the model dtype.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), indices


def _grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if _GROUPED_MM is None:
        return False
    if x.device.type == "cpu":
        return True
    # The CUDA kernels take bf16 on Ampere and newer.
    return (
        x.device.type == "cuda"
        and x.dtype == weight.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, row_expert: torch.Tensor, backend: Backend = "auto"
) -> torch.Tensor:
    """``y[r] = x[r] @ weight[row_expert[r]].T`` for rows sorted by expert, as one grouped matmul.

    x ``[S, K]`` (rows of expert e at ``offsets[e-1]:offsets[e]``), weight ``[E, N, K]``,
    offsets ``[E]`` int32 cumulative row counts, row_expert ``[S]`` the expert of each row
    (used by the ``bmm`` backend only) -> ``[S, N]``.
    """
    if backend == "grouped_mm" or (backend == "auto" and _grouped_mm_runs(x, weight)):
        return _GROUPED_MM(x, weight.transpose(1, 2), offs=offsets)
    # Padded batched matmul: scatter the rows into [E, C, K] with C the largest group.
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    starts = (offsets - counts).long()
    slot = torch.arange(x.shape[0], device=x.device) - starts[row_expert]
    padded = x.new_zeros(weight.shape[0], int(counts.max()), x.shape[1])
    padded = padded.index_put((row_expert, slot), x)
    return torch.bmm(padded, weight.transpose(1, 2))[row_expert, slot]


def experts_forward(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    in_proj: torch.Tensor,
    out_proj: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    gated: bool,
    in_bias: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Weighted sum of each token's top-k experts: ``sum_j weights[t, j] * expert_{indices[t, j]}(x[t])``.

    x ``[T, H]``; weights ``[T, k]``; indices ``[T, k]``; in_proj ``[E, N, H]``; out_proj
    ``[E, H, I]``; in_bias ``[E, N]`` and out_bias ``[E, H]`` optional. An expert computes
    ``out_proj @ (act(gate) * up)`` with ``gate, up = split(in_proj @ x)`` when ``gated``
    (SwiGLU, GeGLU), else ``out_proj @ act(in_proj @ x)``. Returns ``[T, H]`` in x's dtype;
    the weighted sum accumulates in float32.
    """
    num_tokens, top_k = indices.shape
    num_experts = in_proj.shape[0]
    flat_experts = indices.reshape(-1)
    row_expert, order = torch.sort(flat_experts, stable=True)
    row_token = order // top_k
    offsets = torch.bincount(flat_experts, minlength=num_experts).cumsum(0, dtype=torch.int32)

    hidden = grouped_linear(x.index_select(0, row_token), in_proj, offsets, row_expert, backend)
    if in_bias is not None:
        hidden = hidden + in_bias.index_select(0, row_expert)
    if gated:
        gate, up = hidden.chunk(2, dim=-1)
        hidden = act(gate) * up
    else:
        hidden = act(hidden)
    out = grouped_linear(hidden, out_proj, offsets, row_expert, backend)
    if out_bias is not None:
        out = out + out_bias.index_select(0, row_expert)
    weighted = out.float() * weights.reshape(-1).index_select(0, order).unsqueeze(-1)
    total = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    return total.index_add_(0, row_token, weighted).to(x.dtype)
