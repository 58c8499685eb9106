"""The ``loss`` patch: the model's own training loss, computed in chunks over the hidden states.

With ``labels``, the patched forward runs the model's own forward, and the output head's forward
contribution, in that one call, computes :func:`~hf_longctx.loss.chunked.causal_lm_loss` of the
hidden states it is given and returns an empty ``[B, N, 0]`` placeholder in place of the
``[B, N, vocab]`` logits; for the length of the call the model's ``loss_function`` returns that loss.
Everything else is the model's own code path: what a native MoE adds to its loss (a load-balancing
loss with its own coefficient and attention mask, a router z-loss, whatever the family computes, or
nothing when ``output_router_logits`` is off or the coefficient is 0) is added by the model itself,
and its ``aux_loss`` and ``router_logits`` come back as it returns them. The head runs once, inside
its own module call, so FSDP's hooks on the head gather its weight and reduce-scatter its gradient as
for the standard logits. The ``moe`` patch's router losses wrap this from the outside. Calls without
labels go to the model untouched. The output has ``logits=None``.

What the head does after its matmul (Granite's ``logits_scaling``, Cohere's ``logit_scale``,
Gemma's ``final_logit_softcapping``) is found by :func:`head_transform`: before anything is
changed, it runs the model's own forward and the chunked path on a few tokens whose hidden
states (the head's input) are scaled up until softcaps and scales bite, picks the transform that
reproduces the model's logits, and refuses the section with a SpecError when none does or when
the losses differ: a head this file does not know is refused, never trained with a different
objective.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
from torch import nn

from ..config_base import SpecError
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


class _LabelledCall:
    """One forward call with labels: the head's forward computes the chunked loss, the model's loss function
    returns it."""

    def __init__(self, labels: torch.Tensor, num_items_in_batch, shift_labels: torch.Tensor | None = None):
        self.labels = labels
        self.num_items_in_batch = num_items_in_batch
        self.shift_labels = shift_labels
        self.loss: torch.Tensor | None = None

    def loss_function(self, *args, **kwargs) -> torch.Tensor:
        if self.loss is None:
            raise RuntimeError("the model computed its loss without calling its output head")
        return self.loss


def _chunked_forward(model: nn.Module, inner, args: tuple, kwargs: dict, calls: list[_LabelledCall]):
    """``inner`` (the causal LM's forward) with its loss computed in chunks; see the module docstring.

    ``calls`` is the stack of labelled calls that the head's forward (:func:`_head_forward`) reads."""
    arguments = call_arguments(inner, args, kwargs)
    labels = arguments.get("labels")
    if labels is None:
        return inner(*args, **kwargs)
    return_dict = arguments.get("return_dict")
    # every position; shift_labels (shifted before the sequence was sharded, context parallel) go to the head
    kwargs = {k: v for k, v in kwargs.items() if k not in ("logits_to_keep", "return_dict", "shift_labels")}
    call = _LabelledCall(labels, arguments.get("num_items_in_batch"), arguments.get("shift_labels"))
    had_own = "_loss_function" in vars(model)
    own = vars(model).get("_loss_function")
    calls.append(call)
    model._loss_function = call.loss_function  # PreTrainedModel.loss_function returns it, for this call only
    try:
        out = inner(*args, **kwargs, return_dict=True)
    finally:
        calls.pop()
        if had_own:
            model._loss_function = own
        else:
            del model._loss_function
    if call.loss is None:
        raise RuntimeError(f"{type(model).__name__} returned a loss without calling its output head")
    out = type(out)(**{k: v for k, v in out.items() if k != "logits"})  # the head's output is a placeholder
    return out.to_tuple() if return_dict is False else out


def _head_forward(head: nn.Linear, inner, chunk_size: int, transform: HeadTransform, calls: list[_LabelledCall]):
    @functools.wraps(inner)
    def forward(hidden):
        if not calls:
            return inner(hidden)
        call = calls[-1]
        if call.loss is not None:
            raise RuntimeError("the output head ran twice in one forward call with labels; 'loss' computes its "
                               "loss in the head's one call")
        if call.shift_labels is not None:  # position t predicts shift_labels[:, t]: no shift here
            call.loss = chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                              call.shift_labels.reshape(-1).to(hidden.device), chunk_size=chunk_size,
                                              num_items_in_batch=call.num_items_in_batch, bias=head.bias,
                                              transform=transform)
        else:
            call.loss = causal_lm_loss(hidden, head.weight, call.labels, chunk_size=chunk_size,
                                       num_items_in_batch=call.num_items_in_batch, bias=head.bias, transform=transform)
        return hidden.new_empty(*hidden.shape[:-1], 0)  # the model's own steps after the head cost nothing on it

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
    raw: list[torch.Tensor] = []

    def scale_hidden(_module, args):
        return (args[0] * scale["factor"], *args[1:])

    was_training = model.training
    model.eval()
    hooks = [head.register_forward_pre_hook(scale_hidden),
             head.register_forward_hook(lambda _module, _args, output: raw.append(output))]
    try:
        try:
            largest = own_forward(ids, use_cache=False, **kwargs).logits.float().abs().max().item()
            scale["factor"] = _PROBE_LOGIT / largest if largest > 0 else 1.0
            raw.clear()
            own = own_forward(ids, labels=ids, use_cache=False, **kwargs)
        except Exception as err:  # noqa: BLE001  the model's own forward, not ours: nothing to compare with
            raise SpecError(f"'loss' is not supported for model_type '{model.config.model_type}': its own forward "
                            f"fails on the check input ({type(err).__name__}: {err})") from err
        tolerance = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 3e-2
        if len(raw) != 1:
            raise SpecError(f"'loss' is not supported for model_type '{model.config.model_type}': its forward calls "
                            f"its output head {len(raw)} times, not once")
        errors = {t: ((own.logits.float() - t(raw[0]).float()).abs().max() / _PROBE_LOGIT).item()
                  for t in candidate_transforms(model.config)}
        transform = min(errors, key=errors.get)
        if errors[transform] > tolerance:
            raise SpecError(
                f"'loss' is not supported for model_type '{model.config.model_type}': its head computes logits "
                f"that none of {list(errors)} reproduces (closest: relative difference {errors[transform]:.2g}); "
                "the chunked loss would train a different objective"
            )
        calls: list[_LabelledCall] = []
        had_forward, head_forward = "forward" in vars(head), vars(head).get("forward")
        head.forward = _head_forward(head, head.forward, section.chunk_size, transform, calls)
        try:
            ours = _chunked_forward(model, own_forward, (ids,), dict(labels=ids, use_cache=False, **kwargs), calls)
        except Exception as err:  # noqa: BLE001  the model does more with its logits than a head's transform
            raise SpecError(f"'loss' is not supported for model_type '{model.config.model_type}': its forward does "
                            f"not run with the loss computed in its head ({type(err).__name__}: {err})") from err
        finally:
            if had_forward:
                head.forward = head_forward
            else:
                del head.forward
    finally:
        for hook in hooks:
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
    calls: list[_LabelledCall] = []  # the labelled calls in progress, read by the head's forward

    def wrap_forward(inner):
        @functools.wraps(inner)
        def forward(*args, **kwargs):
            return _chunked_forward(model, inner, args, kwargs, calls)

        return forward

    logger.info("loss: chunked cross-entropy, %d tokens per chunk, head %s", section.chunk_size, transform)
    return Applied(wraps=(
        Wrap(model, "forward", wrap_forward),
        Wrap(head, "forward", lambda inner: _head_forward(head, inner, section.chunk_size, transform, calls)),
    ))


register_technique(Technique(section="loss", spec_class=LossSpec, apply=_apply, check=_check, order=30))
