"""Causal-LM cross-entropy over hidden states, without the full ``[N, vocab]`` logits.

At long context the logits dominate training memory: 64k tokens x 128k vocabulary is 32 GiB
in float32, more than the rest of an 8B model's activations. :func:`chunked_cross_entropy`
projects ``chunk_size`` rows of hidden states at a time, and computes the gradients of
each chunk during the forward pass (the fused linear cross-entropy of Liger-Kernel), so the
largest temporary is ``[chunk_size, vocab]``; backward only scales the stored gradients.

The logits are those of the model's head, whatever it does after the matmul
(:class:`HeadTransform`): ``z = s * (h @ W.T + b)``, then ``z = c * tanh(z / c)`` when a
final softcap ``c`` is set (Gemma 2/3). ``s`` is Granite's ``1 / logits_scaling`` or Cohere's
``logit_scale``. The softcap's derivative ``1 - tanh^2`` is applied in place per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class HeadTransform:
    """What a head does to ``h @ W.T + b``: multiply by ``scale``, then softcap (None: no cap)."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The transform on logits computed by the head (any dtype, as the model's own forward does it)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index, divisor, transform):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        needs_grad = any(g is not None for g in (grad_hidden, grad_weight, grad_bias))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            y = targets[start : start + chunk_size]
            valid = y != ignore_index
            safe_y = torch.where(valid, y, 0)
            logits = (h @ weight.t()).float()  # [chunk, vocab]: the only vocabulary-sized temporary
            if bias is not None:
                logits += bias.float()
            if transform.scale != 1.0:
                logits *= transform.scale
            capped = None
            if transform.softcap is not None:
                capped = logits.div_(transform.softcap).tanh_()  # in place: tanh(z / c), kept for the derivative
                logits = capped * transform.softcap
            lse = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(1, safe_y[:, None])[:, 0]
            total += torch.where(valid, lse - target_logits, 0.0).sum()
            if needs_grad:
                # d(loss)/d(z) = (softmax - one_hot(y)) / divisor on valid rows, 0 elsewhere; in place.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(len(y), device=y.device), safe_y] -= 1.0
                grad_logits.mul_((valid / divisor)[:, None])
                if capped is not None:  # dz/d(pre-cap) = 1 - tanh^2
                    grad_logits.mul_(capped.square_().neg_().add_(1.0))
                if transform.scale != 1.0:
                    grad_logits.mul_(transform.scale)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
                grad_logits = grad_logits.to(hidden.dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = grad_logits @ weight
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.t().float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | None = None,
    bias: torch.Tensor | None = None,
    transform: HeadTransform = HeadTransform(),
) -> torch.Tensor:
    """Cross-entropy of ``transform(hidden @ weight.T + bias)`` against ``targets``, ``chunk_size`` rows at a time.

    hidden ``[T, H]`` (any float dtype), weight ``[V, H]`` and bias ``[V]`` (the output projection),
    targets ``[T]`` class indices, ``ignore_index`` where no loss is taken. Logits are
    computed in float32 per chunk. Returns the scalar loss: the sum over valid rows divided
    by ``num_items_in_batch`` if given (the Trainer's count across gradient-accumulation
    steps), else the mean over valid rows, as ``transformers``' ``ForCausalLMLoss``.
    Differentiable in ``hidden``, ``weight`` and ``bias``; peak extra memory ``[chunk_size, V]``
    (twice that with a softcap).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_items_in_batch is None:
        divisor = (targets != ignore_index).sum().clamp(min=1).float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    return _ChunkedCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, ignore_index, divisor, transform)


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    bias: torch.Tensor | None = None,
    transform: HeadTransform = HeadTransform(),
) -> torch.Tensor:
    """Next-token loss of a causal LM from its last hidden states ``[B, N, H]`` and ``labels`` ``[B, N]``.

    Position ``t`` predicts ``labels[:, t + 1]`` (the same shift as ``ForCausalLMLoss``);
    ``weight`` ``[V, H]`` (and ``bias``) is the output embedding, ``transform`` what the head does after it.
    """
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return chunked_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        shifted.reshape(-1).to(hidden.device),
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        bias=bias,
        transform=transform,
    )
