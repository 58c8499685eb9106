"""Top-k routing and grouped expert dispatch, in plain PyTorch (no transformers import).

Tokens are never looped over in Python. Every (token, expert) assignment is sorted by
expert, so that the rows of each expert are contiguous; the experts then run on their slices
of the sorted rows, and each token's k expert outputs are gathered back next to each other,
multiplied by their routing weights and summed.

Three ways to run the experts on the sorted rows (``backend``):

- ``loop`` (the default except for bf16 on a recent GPU): one ``torch.mm`` per expert and
  projection, with a hand-written backward (``_ExpertMLPs``). Every intermediate is held per
  expert (``[rows of e, I]``) instead of in one ``[T * k, I]`` buffer: on CPU a fresh buffer above
  glibc's 32 MiB mmap threshold is a fresh mapping, page-faulted in at every allocation (filling a new 8192 x 1536 float32
  buffer took 13.7 ms against 1.9 ms for a reused one on a 2-core CPU, and 8 experts' 1024 x 1536
  buffers 1.8 ms), and the autograd version of this dispatch makes several such buffers per step.
  The backward writes each gradient straight into its slice (no ``cat`` of the gate and up
  halves) and skips the gradients nobody asked for (frozen experts).
- ``grouped_mm``: each projection of all experts as one grouped matrix multiply
  (``torch.nn.functional.grouped_mm`` or ``torch._grouped_mm``), autograd's backward; the
  default for bf16 on CUDA devices of compute capability 8.0 and newer, where it is one kernel
  launch per projection instead of one per expert (not timed against ``loop`` on a GPU).
- ``bmm``: a padded ``torch.bmm`` over ``[E, largest group, K]``; runs anywhere.

Under ``torch.autocast`` the ``auto`` choice avoids ``loop`` (whose preallocated outputs do not
follow autocast's dtype) and takes ``grouped_mm`` where it runs, else ``bmm``.

The moves between token order and expert order are gathers whose backward is again a gather
(``_gather_rows``), through the inverse of the sort permutation: autograd's own backward of
``index_select`` is an ``index_add`` (a ``scatter_add`` on CPU), which took ~80 ms per call for
8192 x 512 float32 rows on a 2-core CPU, against ~5 ms for the gather.

Expert weights use transformers' layout for MoE experts (Mixtral, Qwen2-MoE): the input
projection ``[E, N, H]`` (for gated MLPs ``N = 2 I``, the gate rows first, then the up rows),
the output projection ``[E, H, I]``.
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

Backend = Literal["auto", "loop", "grouped_mm", "bmm"]
BACKENDS: tuple[str, ...] = get_args(Backend)

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing with renormalised weights (Mixtral's router).

    ``router_logits`` ``[T, E]`` -> (weights ``[T, k]`` float32, summing to 1 per token;
    expert indices ``[T, k]`` int64). The softmax runs in float32 whatever the model dtype.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), indices


def _cuda_grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # The CUDA kernels take bf16 on Ampere and newer.
    return (
        _GROUPED_MM is not None
        and x.device.type == "cuda"
        and x.dtype == weight.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def resolve_backend(backend: Backend, x: torch.Tensor, weight: torch.Tensor) -> Backend:
    """The backend ``auto`` stands for on this input (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if _cuda_grouped_mm_runs(x, weight):
        return "grouped_mm"
    if torch.is_autocast_enabled(x.device.type):
        return "grouped_mm" if _GROUPED_MM is not None and x.device.type == "cpu" else "bmm"
    return "loop"


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, row_expert: torch.Tensor, backend: Backend
) -> torch.Tensor:
    """``y[r] = x[r] @ weight[row_expert[r]].T`` for rows sorted by expert, as one grouped matmul.

    x ``[S, K]`` (rows of expert e at ``offsets[e-1]:offsets[e]``), weight ``[E, N, K]``,
    offsets ``[E]`` int32 cumulative row counts, row_expert ``[S]`` the expert of each row
    (used by the ``bmm`` backend only) -> ``[S, N]``. ``backend``: ``grouped_mm`` or ``bmm``.
    """
    if backend == "grouped_mm":
        if _GROUPED_MM is None:
            raise RuntimeError("the grouped_mm MoE backend needs torch.nn.functional.grouped_mm or torch._grouped_mm")
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
    # order[r] = the (token, slot) assignment t * k + j sorted to row r; inverse[t * k + j] = its row.
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat_experts, minlength=num_experts)
    rows = _gather_rows(x, order // top_k, inverse)
    backend = resolve_backend(backend, x, in_proj)
    if backend == "loop":
        out = _ExpertMLPs.apply(rows, in_proj, out_proj, in_bias, out_bias, counts.tolist(), act, gated)
    else:
        out = _experts_grouped(rows, in_proj, out_proj, in_bias, out_bias, counts, row_expert, act, gated, backend)
    per_token = _gather_rows(out, inverse, order).float().view(num_tokens, top_k, -1)  # [T, k, H]
    # Multiply-then-sum, as Mixtral does: the router gradient is a small difference of nearly equal
    # expert outputs, and a bmm's other reduction order moved it by 4e-5 from Mixtral's.
    return (per_token * weights.float().unsqueeze(-1)).sum(1).to(x.dtype)


def _experts_grouped(rows, in_proj, out_proj, in_bias, out_bias, counts, row_expert, act, gated, backend):
    """The experts on the sorted rows with one grouped (or padded batched) matmul per projection."""
    offsets = counts.cumsum(0, dtype=torch.int32)
    hidden = grouped_linear(rows, in_proj, offsets, row_expert, backend)
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
    return out


def _linear(x, weight, bias, out=None):
    """``x @ weight.T (+ bias)``, written into ``out`` when given."""
    return torch.mm(x, weight.t(), out=out) if bias is None else torch.addmm(bias, x, weight.t(), out=out)


class _ExpertMLPs(torch.autograd.Function):
    """The ``loop`` backend: the experts' MLPs on their slices of the sorted rows, one ``torch.mm``
    per expert and projection, intermediates held per expert, hand-written backward.

    forward(rows ``[S, H]`` sorted by expert, in_proj ``[E, N, H]``, out_proj ``[E, H, I]``,
    in_bias ``[E, N]`` or None, out_bias ``[E, H]`` or None, counts (rows per expert, a list of
    ints), act, gated) -> ``[S, H]``. The activation's derivative comes from autograd on the
    saved pre-activation, so any activation module works (SiLU, GELU, tanh-GELU).
    """

    @staticmethod
    def forward(ctx, rows, in_proj, out_proj, in_bias, out_bias, counts, act, gated):
        size = out_proj.shape[2]
        out = rows.new_empty(rows.shape[0], out_proj.shape[1])
        saved = []
        start = 0
        for e, count in enumerate(counts):
            stop = start + count
            if count:
                x = rows[start:stop]
                bias = None if in_bias is None else in_bias[e]
                if gated:
                    gate = _linear(x, in_proj[e, :size], None if bias is None else bias[:size])
                    up = _linear(x, in_proj[e, size:], None if bias is None else bias[size:])
                    hidden = act(gate)
                    hidden = hidden * up if hidden.data_ptr() == gate.data_ptr() else hidden.mul_(up)
                    saved += [gate, up, hidden]
                else:
                    pre = _linear(x, in_proj[e], bias)
                    hidden = act(pre)
                    saved += [pre, hidden]
                _linear(hidden, out_proj[e], None if out_bias is None else out_bias[e], out=out[start:stop])
            start = stop
        ctx.save_for_backward(rows, in_proj, out_proj, *saved)
        ctx.counts, ctx.act, ctx.gated = counts, act, gated
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        rows, in_proj, out_proj, *saved = ctx.saved_tensors
        need_rows, need_in, need_out, need_in_bias, need_out_bias = ctx.needs_input_grad[:5]
        gated, size = ctx.gated, out_proj.shape[2]
        grad_out = grad_out.contiguous()
        grad_rows = torch.empty_like(rows) if need_rows else None
        # Every expert's slice is written below (zeros for experts without rows).
        grad_in = torch.empty_like(in_proj) if need_in else None
        grad_out_proj = torch.empty_like(out_proj) if need_out else None
        grad_in_bias = in_proj.new_empty(in_proj.shape[:2]) if need_in_bias else None
        grad_out_bias = out_proj.new_empty(out_proj.shape[:2]) if need_out_bias else None
        tensors = iter(saved)
        start = 0
        for e, count in enumerate(ctx.counts):
            stop = start + count
            if not count:
                for grad in (grad_in, grad_out_proj, grad_in_bias, grad_out_bias):
                    if grad is not None:
                        grad[e].zero_()
                continue
            x, dy = rows[start:stop], grad_out[start:stop]
            pre, up, hidden = (next(tensors), next(tensors), next(tensors)) if gated else (next(tensors), None, next(tensors))
            if need_out:
                torch.mm(dy.t(), hidden, out=grad_out_proj[e])
            if need_out_bias:
                torch.sum(dy, 0, out=grad_out_bias[e])
            grad_hidden = dy @ out_proj[e]
            with torch.enable_grad():
                leaf = pre.detach().requires_grad_()
                activated = ctx.act(leaf)
            if gated:
                grad_up = grad_hidden * activated.detach()
                (grad_gate,) = torch.autograd.grad(activated, leaf, grad_hidden.mul_(up))
                parts = ((grad_gate, slice(0, size)), (grad_up, slice(size, 2 * size)))
            else:
                (grad_pre,) = torch.autograd.grad(activated, leaf, grad_hidden)
                parts = ((grad_pre, slice(None)),)
            for i, (grad, cols) in enumerate(parts):
                if need_rows:
                    if i == 0:
                        torch.mm(grad, in_proj[e, cols], out=grad_rows[start:stop])
                    else:
                        grad_rows[start:stop].addmm_(grad, in_proj[e, cols])
                if need_in:
                    torch.mm(grad.t(), x, out=grad_in[e, cols])
                if need_in_bias:
                    torch.sum(grad, 0, out=grad_in_bias[e, cols])
            start = stop
        return grad_rows, grad_in, grad_out_proj, grad_in_bias, grad_out_bias, None, None, None


class _GatherRows(torch.autograd.Function):
    """``src.index_select(0, index)`` where each row of ``src`` is read by the same number of
    output rows, with a gather as backward instead of autograd's ``index_add``."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor, readers: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(readers)
        ctx.num_src = src.shape[0]
        return src.index_select(0, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (readers,) = ctx.saved_tensors
        summed = grad.index_select(0, readers).view(ctx.num_src, -1, grad.shape[-1]).sum(1)
        return summed, None, None


def _gather_rows(src: torch.Tensor, index: torch.Tensor, readers: torch.Tensor) -> torch.Tensor:
    """``src[index]`` for src ``[R, D]``, index ``[R * m]`` reading every source row exactly ``m``
    times; readers ``[R * m]`` lists the output rows that read source row ``i`` at
    ``readers[i * m : (i + 1) * m]``. Returns ``[R * m, D]``; the gradient of a source row is the
    sum of its readers' gradients, gathered."""
    return _GatherRows.apply(src, index, readers)
