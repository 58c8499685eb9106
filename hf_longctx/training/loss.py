"""Causal-LM cross-entropy over hidden states, without the full ``[N, vocab]`` logits.

At long context the logits dominate training memory: 64k tokens x 128k vocabulary is 32 GiB
in float32, more than the rest of an 8B model's activations. :func:`chunked_cross_entropy`
projects ``chunk_size`` rows of hidden states at a time, and computes the gradients of
each chunk during the forward pass (the fused linear cross-entropy of Liger-Kernel), so the
largest temporary is ``[chunk_size, vocab]``; backward only scales the stored gradients.

:func:`use_chunked_loss` makes a transformers causal LM compute its training loss this way:
the loss is computed by calling the output projection module, so FSDP gathers its weight
and reduce-scatters its gradient exactly as for the standard logits.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..families import get_family

IGNORE_INDEX = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index, divisor):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            y = targets[start : start + chunk_size]
            valid = y != ignore_index
            safe_y = torch.where(valid, y, 0)
            logits = (h @ weight.t()).float()  # [chunk, vocab]: the only vocabulary-sized temporary
            lse = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(1, safe_y[:, None])[:, 0]
            total += torch.where(valid, lse - target_logits, 0.0).sum()
            if needs_grad:
                # d(loss)/d(logits) = (softmax - one_hot(y)) / divisor on valid rows, 0 elsewhere; in place.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(len(y), device=y.device), safe_y] -= 1.0
                grad_logits.mul_((valid / divisor)[:, None])
                grad_logits = grad_logits.to(hidden.dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = grad_logits @ weight
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.t().float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, ``chunk_size`` rows at a time.

    hidden ``[T, H]`` (any float dtype), weight ``[V, H]`` (the output projection),
    targets ``[T]`` class indices, ``ignore_index`` where no loss is taken. Logits are
    computed in float32 per chunk. Returns the scalar loss: the sum over valid rows divided
    by ``num_items_in_batch`` if given (the Trainer's count across gradient-accumulation
    steps), else the mean over valid rows, as ``transformers``' ``ForCausalLMLoss``.
    Differentiable in ``hidden`` and ``weight``; peak extra memory ``[chunk_size, V]``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_items_in_batch is None:
        divisor = (targets != ignore_index).sum().clamp(min=1).float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, divisor)


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Next-token loss of a causal LM from its last hidden states ``[B, N, H]`` and ``labels`` ``[B, N]``.

    Position ``t`` predicts ``labels[:, t + 1]`` (the same shift as ``ForCausalLMLoss``);
    ``weight`` ``[V, H]`` is the output embedding.
    """
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return chunked_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        shifted.reshape(-1).to(hidden.device),
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
    )


def use_chunked_loss(model: nn.Module, chunk_size: int = 4096) -> Callable[[], None]:
    """Make ``model`` (a transformers ``*ForCausalLM``) compute its loss with :func:`causal_lm_loss`.

    Calls with ``labels`` run the decoder, then the chunked loss on its last hidden state,
    and return ``CausalLMOutputWithPast(loss=..., logits=None)``; calls without ``labels``
    (generation, evaluation of logits) run the original forward. Packed training batches
    carry ``position_ids`` restarting per document and no ``attention_mask``: the cache is
    disabled so that transformers derives the block-diagonal mask from the positions.

    The loss is computed by calling the output projection module itself (its forward takes
    ``labels`` while this patch is on), so that when FSDP shards that module on its own
    (as for LoRA) its hooks gather the weight for the forward and the backward and
    reduce-scatter its gradient. The changes are on these instances only; the returned
    function undoes them.
    """
    head = _output_projection(model)
    original_forward, original_head_forward = model.forward, head.forward

    def head_forward(self, hidden, labels=None, num_items_in_batch=None):
        if labels is None:
            return original_head_forward(hidden)
        return causal_lm_loss(hidden, self.weight, labels, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch)

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, labels=None, num_items_in_batch=None,
        logits_to_keep=0, **kwargs,
    ):
        if labels is None:
            return original_forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=logits_to_keep, **kwargs,
            )
        if self.get_output_embeddings() is not head:
            raise ValueError("the output embedding was replaced after use_chunked_loss (is lm_head a LoRA target?)")
        kwargs["use_cache"] = False
        outputs = get_family(self).decoder(self)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        loss = head(outputs.last_hidden_state, labels=labels, num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    model.forward = types.MethodType(forward, model)
    head.forward = types.MethodType(head_forward, head)

    def undo() -> None:
        del model.forward
        del head.forward

    return undo


def _output_projection(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(
            f"chunked loss needs the output embedding to be a plain nn.Linear without bias; "
            f"{type(model).__name__} has {type(head).__name__} (is lm_head a LoRA target?)"
        )
    return head
