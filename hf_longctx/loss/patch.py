"""The ``loss`` patch: the model's own training loss, computed in chunks over the hidden states.

With ``labels``, the patched forward runs the decoder (so the ``[B, N, vocab]`` logits are never
built) and calls the output head once, with the labels: the head's own forward contribution
computes :func:`~hf_longctx.loss.chunked.causal_lm_loss`, so that FSDP's hooks on the head gather
its weight and reduce-scatter its gradient as for the standard logits. What a native MoE adds to
its loss (``router_aux_loss_coef`` times its module's ``load_balancing_loss_func`` of the router
logits) is added as the model adds it; the ``moe`` patch's router losses wrap this from the
outside. Calls without labels go to the model untouched. The output has ``logits=None``.

What the head does after its matmul (Granite's ``logits_scaling``, Cohere's ``logit_scale``,
Gemma's ``final_logit_softcapping``) is found by :func:`head_transform`: before anything is
changed, it runs the model's own forward and the chunked path on a few tokens whose hidden
states are scaled up until softcaps and scales bite, picks the transform that reproduces the
model's logits, and refuses the section with a SpecError when none does or when the losses
differ: a head this file does not know is refused, never trained with a different objective.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import sys

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
from transformers.utils import ModelOutput

from ..config_base import SpecError
from ..families import get_family
from ..patching import Applied, Technique, Wrap, call_arguments, register_technique
from .chunked import HeadTransform, causal_lm_loss, chunked_cross_entropy
from .config import LossSpec

logger = logging.getLogger(__name__)

_PROBE_TOKENS = 12
_PROBE_LOGIT = 40.0  # largest logit of the probe: far into a softcap of 30 or 50, yet an exact float32 softmax


def candidate_transforms(config) -> list[HeadTransform]:
    """What a head may do to ``lm_head(hidden)``, from the config values heads are known to read, most
    complete first: Granite's ``logits / logits_scaling``, Cohere's ``logits * logit_scale``, the final
    ``tanh`` softcap of Gemma 2/3. A config can carry a value its head ignores; the probe picks the one
    the head really applies."""
    scales = [1.0]
    if getattr(config, "logits_scaling", None):
        scales.append(1.0 / config.logits_scaling)
    if getattr(config, "logit_scale", None) is not None:
        scales += [s * config.logit_scale for s in scales]
    caps = [None]
    if getattr(config, "final_logit_softcapping", None) is not None:
        caps.append(config.final_logit_softcapping)
    return [HeadTransform(scale, cap) for cap in reversed(caps) for scale in reversed(scales)]


def _router_aux_coef(model: nn.Module) -> float | None:
    coef = getattr(model, "router_aux_loss_coef", None)
    return getattr(model.config, "router_aux_loss_coef", None) if coef is None else coef


def _last_hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.last_hidden_state


def _load_balancing_loss(model: nn.Module):
    """The router loss function of a native MoE family's modeling module (Mixtral's), or None."""
    return getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)


def _chunked_forward(model: nn.Module, head: nn.Module, inner, args: tuple, kwargs: dict, head_loss=None):
    """``inner`` (a causal LM forward) with its loss computed by ``head(hidden, labels=...)`` (or ``head_loss``,
    a function of the same arguments); see the module docstring."""
    arguments = call_arguments(inner, args, kwargs)
    labels = arguments.pop("labels", None)
    if labels is None:
        return inner(*args, **kwargs)
    if model.get_output_embeddings() is not head:
        raise ValueError("the output embedding was replaced after the 'loss' patch (is lm_head a LoRA target?)")
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    shift_labels = arguments.pop("shift_labels", None)  # shifted before the sequence was sharded (context parallel)
    return_dict = arguments.pop("return_dict", None)
    arguments.pop("logits_to_keep", None)
    config = model.config.get_text_config(decoder=True)
    if arguments.get("output_router_logits") is None and getattr(config, "output_router_logits", None) is not None:
        arguments["output_router_logits"] = config.output_router_logits
    # The decoder, then the head once: the head must not run twice in a step (FSDP hooks on it).
    outputs = get_family(model).decoder(model)(**arguments)
    loss = (head_loss or head)(_last_hidden(outputs), labels=labels, num_items_in_batch=num_items_in_batch,
                               **({} if shift_labels is None else {"shift_labels": shift_labels}))
    fields = dict(outputs.items()) if isinstance(outputs, ModelOutput) else {}
    aux_loss = None
    if arguments.get("output_router_logits") and fields.get("router_logits") is not None:  # as the model adds it
        aux_loss = _load_balancing_loss(model)(fields["router_logits"], model.num_experts, model.num_experts_per_tok,
                                               arguments.get("attention_mask"))
        aux_loss = torch.as_tensor(aux_loss, device=loss.device)  # older releases return a plain 0 without routers
        loss = loss + _router_aux_coef(model) * aux_loss
    output_class = MoeCausalLMOutputWithPast if "router_logits" in fields else CausalLMOutputWithPast
    names = {f.name for f in dataclasses.fields(output_class)} - {"loss", "logits", "aux_loss"}
    out = output_class(loss=loss, logits=None, **{k: v for k, v in fields.items() if k in names},
                       **({"aux_loss": aux_loss} if output_class is MoeCausalLMOutputWithPast else {}))
    return out.to_tuple() if return_dict is False else out


def _head_forward(head: nn.Linear, inner, chunk_size: int, transform: HeadTransform):
    @functools.wraps(inner)
    def forward(hidden, labels=None, num_items_in_batch=None, shift_labels=None):
        if labels is None:
            return inner(hidden)
        if shift_labels is not None:  # position t predicts shift_labels[:, t]: no shift here
            return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                         shift_labels.reshape(-1).to(hidden.device), chunk_size=chunk_size,
                                         num_items_in_batch=num_items_in_batch, bias=head.bias, transform=transform)
        return causal_lm_loss(hidden, head.weight, labels, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch,
                              bias=head.bias, transform=transform)

    return forward


def _check(model: nn.Module, section: LossSpec, spec) -> None:
    head = model.get_output_embeddings()
    name = model.config.model_type
    if not isinstance(head, nn.Linear):
        raise SpecError(f"'loss' needs the output embedding to be an nn.Linear; {type(model).__name__} has "
                        f"{type(head).__name__} (is lm_head a LoRA target?)")
    parameters = inspect.signature(type(model).forward).parameters
    if "logits_to_keep" not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        raise SpecError(f"'loss' is not supported for model_type '{name}': its forward has no logits_to_keep, "
                        "so the full logits could not be skipped")
    if getattr(model.config.get_text_config(decoder=True), "output_router_logits", None) is not None and (
            _router_aux_coef(model) is None or _load_balancing_loss(model) is None
            or not hasattr(model, "num_experts") or not hasattr(model, "num_experts_per_tok")):
        raise SpecError(f"'loss' is not supported for model_type '{name}': it returns router losses that the "
                        "chunked path cannot reproduce (no router_aux_loss_coef, load_balancing_loss_func, "
                        "num_experts or num_experts_per_tok)")
    head_transform(model, section)


@torch.no_grad()
def head_transform(model: nn.Module, section: LossSpec = LossSpec()) -> HeadTransform:
    """The transform the head applies after its matmul, found by running the model on a short input.

    Refuses (SpecError) unless one of :func:`candidate_transforms` reproduces the model's own logits
    and the chunked path reproduces the model's own loss.
    """
    head = model.get_output_embeddings()
    own_forward = type(model).forward.__get__(model)
    generator = torch.Generator().manual_seed(0)
    vocab_size = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab_size, (1, _PROBE_TOKENS), generator=generator).to(head.weight.device)
    kwargs = {"output_router_logits": True} if getattr(model.config, "output_router_logits", None) is not None else {}
    scale = {"factor": 1.0}
    hidden: list[torch.Tensor] = []

    def scale_hidden(_module, _args, output):
        if isinstance(output, tuple):
            output = (output[0] * scale["factor"], *output[1:])
        else:
            output.last_hidden_state = output.last_hidden_state * scale["factor"]
        hidden.append(_last_hidden(output))
        return output

    was_training = model.training
    model.eval()
    hook = get_family(model).decoder(model).register_forward_hook(scale_hidden)
    try:
        try:
            largest = own_forward(ids, use_cache=False, **kwargs).logits.float().abs().max().item()
            scale["factor"] = _PROBE_LOGIT / largest if largest > 0 else 1.0
            hidden.clear()
            own = own_forward(ids, labels=ids, use_cache=False, **kwargs)
        except Exception as err:  # noqa: BLE001  the model's own forward, not ours: nothing to compare with
            raise SpecError(f"'loss' is not supported for model_type '{model.config.model_type}': its own forward "
                            f"fails on the check input ({type(err).__name__}: {err})") from err
        raw = head(hidden[0])
        tolerance = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 3e-2
        errors = {t: ((own.logits.float() - t(raw).float()).abs().max() / _PROBE_LOGIT).item()
                  for t in candidate_transforms(model.config)}
        transform = min(errors, key=errors.get)
        if errors[transform] > tolerance:
            raise SpecError(
                f"'loss' is not supported for model_type '{model.config.model_type}': its head computes logits "
                f"that none of {list(errors)} reproduces (closest: relative difference {errors[transform]:.2g}); "
                "the chunked loss would train a different objective"
            )
        try:
            ours = _chunked_forward(model, head, own_forward, (ids,), dict(labels=ids, use_cache=False, **kwargs),
                                    head_loss=_head_forward(head, head.forward, section.chunk_size, transform))
        except Exception as err:  # noqa: BLE001  the decoder alone does not run as the model runs it
            raise SpecError(f"'loss' is not supported for model_type '{model.config.model_type}': its decoder "
                            f"does not run on its own ({type(err).__name__}: {err})") from err
    finally:
        hook.remove()
        model.train(was_training)
    loss_error = abs(ours.loss.item() - own.loss.item()) / max(abs(own.loss.item()), 1e-6)
    if loss_error > tolerance:
        raise SpecError(
            f"'loss' is not supported for model_type '{model.config.model_type}': its loss differs from the "
            f"chunked cross-entropy of its logits (relative difference {loss_error:.2g})"
        )
    return transform


def _apply(model: nn.Module, section: LossSpec, spec) -> Applied:
    head = model.get_output_embeddings()
    transform = head_transform(model, section)

    def wrap_forward(inner):
        @functools.wraps(inner)
        def forward(*args, **kwargs):
            return _chunked_forward(model, head, inner, args, kwargs)

        return forward

    logger.info("loss: chunked cross-entropy, %d tokens per chunk, head %s", section.chunk_size, transform)
    return Applied(wraps=(
        Wrap(model, "forward", wrap_forward),
        Wrap(head, "forward", lambda inner: _head_forward(head, inner, section.chunk_size, transform)),
    ))


register_technique(Technique(section="loss", spec_class=LossSpec, apply=_apply, check=_check, order=30))
