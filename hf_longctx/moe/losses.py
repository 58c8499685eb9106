"""Router losses, and the forward wrapper that exposes them the way Mixtral does.

``load_balancing_loss`` is transformers' own (Switch Transformer, eqs. 4-6, as used by
Mixtral and Qwen-MoE); ``router_z_loss`` is ST-MoE's (Zoph et al., 2022, eq. 5): the mean
over tokens of ``logsumexp(router_logits) ** 2``, which keeps the router logits small.

An upcycled model's ``forward`` accepts ``output_router_logits`` and returns
``MoeCausalLMOutputWithPast`` fields ``aux_loss`` and ``router_logits`` (plus ``router_z_loss``),
and with ``labels`` adds ``router_aux_loss_coef * aux_loss + router_z_loss_coef * router_z_loss``
to the loss, both coefficients read from the model config at each call.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as load_balancing_loss

from .. import compat


@dataclass
class MoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """Mixtral's output, plus the router z-loss (a scalar, averaged over the MoE layers)."""

    router_z_loss: torch.Tensor | None = None


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over MoE layers and (unpadded) tokens of ``logsumexp(logits) ** 2``.

    router_logits: one ``[B * L, E]`` tensor per MoE layer; attention_mask ``[B, L]`` (1 = token).
    """
    z = torch.stack([torch.logsumexp(logits.float(), dim=-1) ** 2 for logits in router_logits])  # [layers, B*L]
    if attention_mask is None:
        return z.mean()
    mask = attention_mask.reshape(1, -1).to(z)
    return (z * mask).sum() / (mask.sum() * z.shape[0])


def with_router_losses(model: nn.Module, forward: Callable, *, routers: list[nn.Module], num_experts: int, top_k: int):
    """``forward`` (the causal LM's) extended with ``output_router_logits`` and the router losses.

    ``output_router_logits`` defaults to ``config.output_router_logits`` when the config sets
    it, else to ``model.training``: a training step adds the router losses to the loss.
    """
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def wrapped(*args, output_router_logits: bool | None = None, **kwargs):
        config = model.config
        if output_router_logits is None:
            output_router_logits = getattr(config, "output_router_logits", None)
        if output_router_logits is None:
            output_router_logits = model.training
        if not output_router_logits:
            return forward(*args, **kwargs)
        return_dict = kwargs.pop("return_dict", None)
        collected: list[torch.Tensor] = []
        # Hooks live only for this call: a gradient-checkpointing recompute in backward adds nothing.
        hooks = [router.register_forward_hook(lambda _m, _i, out: collected.append(out[0])) for router in routers]
        try:
            out = forward(*args, return_dict=True, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        attention_mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            attention_mask = None  # a 4D custom mask has no per-token padding to read
        logits = tuple(collected)
        aux_loss = load_balancing_loss(logits, num_experts, top_k, attention_mask)
        z_loss = router_z_loss(logits, attention_mask)
        loss = out.loss
        if loss is not None:
            loss = loss + config.router_aux_loss_coef * aux_loss.to(loss.device)
            loss = loss + config.router_z_loss_coef * z_loss.to(loss.device)
        result = MoECausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=out.logits,
            **{compat.CACHE: compat.cache_of(out)},
            hidden_states=out.get("hidden_states"),
            attentions=out.get("attentions"),
            router_logits=logits,
            router_z_loss=z_loss,
        )
        return result.to_tuple() if return_dict is False else result

    return wrapped
