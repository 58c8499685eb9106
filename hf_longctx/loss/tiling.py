"""Sequence tiling (``tiling``): the memory of a long-sequence training step, not its math.

At long context what a training step keeps grows with the sequence. Three things are left
after the chunked loss (``loss``), and this section removes them, on any family whose
layers and MLPs :mod:`hf_longctx.families` finds, dense or MoE:

- ``mlp``: every layer's MLP runs in tiles of ``mlp_tile_size`` tokens along the sequence and
  keeps only its input; backward recomputes one tile at a time. The ``[tokens, intermediate]``
  activations (three or four of them per layer, 3.5x the hidden width in Llama) shrink to one
  tile's. A token's MLP output depends on that token only, so tiles give the same numbers;
  before anything is changed each MLP is checked on a probe (a capacity-limited MoE, whose
  routing depends on its neighbours, is refused).
- ``checkpointing``: every decoder layer keeps only its input hidden states and recomputes
  its inside during backward (gradient checkpointing, done here so that it composes with the
  tiled MLP and the offload; the RNG state is replayed so dropout draws the same masks).
  A training step runs without a KV cache whatever the config's ``use_cache`` says (configs as
  shipped say ``true``), as transformers' own gradient checkpointing does: the model's forward
  gets ``use_cache=False`` and the layers no cache, or the cache would keep every layer's keys
  and values for the whole step.
- ``offload``: those checkpointed inputs are copied to pinned CPU memory in forward and back
  to the accelerator in backward, one layer at a time. A model on the CPU has nothing to
  offload to, so there it changes nothing.

Both recomputations return the gradients of the parameters from their ``autograd.Function``
(the parameters are its inputs), so whatever FSDP or peft put in a module's parameters at
forward time gets its gradient through the ordinary autograd graph.

The default tile is ``hidden_size`` tokens (as Arctic Long Sequence Training shards its MLP:
``ceil(tokens / hidden_size)`` tiles): the largest MLP temporary is then
``hidden_size x intermediate_size`` values whatever the sequence length.
:func:`default_tile_sizes` gives the same number of tokens per chunk of the ``loss`` section.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..config_base import SectionSpec, SpecError, spec_field
from ..families import get_family, text_config
from ..patching import Applied, Technique, Wrap, register_technique

logger = logging.getLogger(__name__)

_PROBE_TILE = 3  # tokens per tile of the patch-time probe: an odd size so that the last tile is short


@dataclass
class TilingSpec(SectionSpec):
    section = "tiling"
    conflicts = {"moe": "the upcycled MoE replaces the MLPs that tiling wraps, and its router losses need every "
                        "token's router logits with gradients"}

    mlp: bool = spec_field(True, help="Compute every layer's MLP in tiles along the sequence, recomputed in backward.")
    mlp_tile_size: int | None = spec_field(
        None, help="Tokens per MLP tile; null: the model's hidden_size (the tile's temporaries follow its widths)."
    )
    checkpointing: bool = spec_field(False, help="Keep only each decoder layer's input; recompute it in backward.")
    offload: bool = spec_field(False, help="Keep those checkpointed inputs in pinned CPU memory (needs checkpointing).")

    def __post_init__(self):
        self._require(self.mlp_tile_size is None or self.mlp_tile_size >= 1, "mlp_tile_size", "must be >= 1 token")
        self._require(not self.offload or self.checkpointing, "offload",
                      "offloads the checkpointed layer inputs, so it needs checkpointing: true")
        self._require(self.mlp or self.checkpointing, "mlp", "with checkpointing: false too the section does nothing")


def default_tile_sizes(config) -> dict[str, int]:
    """Tile sizes from the model's widths: ``hidden_size`` tokens per MLP tile and per loss chunk, so that the
    largest temporaries are ``[hidden, intermediate]`` (MLP) and ``[hidden, vocab]`` (loss), whatever the length.
    Smaller loss chunks save little and cost time: each chunk's weight-gradient update reads and writes the whole
    ``[vocab, hidden]`` matrix."""
    hidden = text_config(config).hidden_size
    return {"mlp_tile_size": hidden, "loss_chunk_size": hidden}


class _RngReplay:
    """The CPU and current-accelerator RNG states at forward time, to replay in a recomputation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accelerator = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.accelerator is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.accelerator is not None:
                torch.cuda.set_rng_state(self.accelerator, self.device)
            yield


def _grads(outputs: torch.Tensor, inputs: list[torch.Tensor], grad_outputs: torch.Tensor) -> list[torch.Tensor | None]:
    wanted = [x for x in inputs if x.requires_grad]
    found = iter(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True) if wanted else ())
    return [next(found) if x.requires_grad else None for x in inputs]


def _accumulate(total: list, grads: list) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            # the first tile's gradient is copied: autograd may hand back a view of grad_outputs
            total[i] = g.clone() if total[i] is None else total[i].add_(g)


def _tile(hidden: torch.Tensor, tile: slice) -> torch.Tensor:
    # A copy: contiguous for MLPs that view it flat, and safe from MLPs that scale their input in place (jitter).
    return hidden[..., tile, :].clone(memory_format=torch.contiguous_format)


class _TiledMLP(torch.autograd.Function):
    """``run`` (an MLP: ``[..., T, H] -> [..., T, H']`` token by token) in tiles of ``tile_size`` along T."""

    @staticmethod
    def forward(ctx, run, tile_size, hidden, *params):
        ctx.params = params  # parameters are inputs, so their gradients come back through autograd
        ctx.run, ctx.tile_size, ctx.rng = run, tile_size, _RngReplay(hidden.device)
        ctx.save_for_backward(hidden)
        out = None
        with torch.no_grad():
            for start in range(0, hidden.shape[-2], tile_size):
                y = run(_tile(hidden, slice(start, start + tile_size)))
                if out is None:
                    out = y.new_empty(*hidden.shape[:-1], y.shape[-1])
                out[..., start : start + tile_size, :] = y
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (hidden,) = ctx.saved_tensors
        params = list(ctx.params)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[2] else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        with ctx.rng.replay():
            for start in range(0, hidden.shape[-2], ctx.tile_size):
                tile = slice(start, start + ctx.tile_size)
                x = hidden[..., tile, :].detach().requires_grad_(grad_hidden is not None)
                with torch.enable_grad():
                    y = ctx.run(_tile(x, slice(None)))
                grads = _grads(y, [x, *params], grad_out[..., tile, :])
                if grad_hidden is not None:
                    grad_hidden[..., tile, :] = grads[0]
                _accumulate(grad_params, grads[1:])
        return None, None, grad_hidden, *grad_params


class _CheckpointedLayer(torch.autograd.Function):
    """``run`` (a decoder layer as a function of its input hidden states) keeping only that input,
    on the CPU when ``offload``; backward recomputes the layer."""

    @staticmethod
    def forward(ctx, run, offload, hidden, *params):
        ctx.params = params
        ctx.run, ctx.rng, ctx.device = run, _RngReplay(hidden.device), hidden.device
        ctx.offloaded = offload and hidden.device.type != "cpu"
        if ctx.offloaded:
            ctx.host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            ctx.host.copy_(hidden.detach(), non_blocking=True)
        else:
            ctx.save_for_backward(hidden)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.offloaded:
            hidden = ctx.host.to(ctx.device, non_blocking=True)
            del ctx.host
        else:
            (hidden,) = ctx.saved_tensors
        params = list(ctx.params)
        x = hidden.detach().requires_grad_(ctx.needs_input_grad[2])
        with ctx.rng.replay(), torch.enable_grad():
            y = ctx.run(x)
        grads = _grads(y, [x, *params], grad_out)
        return None, None, *grads


def _apply_function(function, run, option, hidden: torch.Tensor, module: nn.Module) -> torch.Tensor:
    params = [p for p in module.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    return function.apply(run, option, hidden, *params)


def tiled_mlp(mlp: nn.Module, inner, tile_size: int):
    """The forward of ``mlp`` (its original ``inner``) computed in tiles of ``tile_size`` tokens."""

    @functools.wraps(inner)
    def forward(hidden_states, *args, **kwargs):
        if hidden_states.dim() < 2 or hidden_states.shape[-2] <= tile_size:
            return inner(hidden_states, *args, **kwargs)
        return _apply_function(_TiledMLP, lambda h: inner(h, *args, **kwargs), tile_size, hidden_states, mlp)

    return forward


def _uses_cache(args, kwargs) -> bool:
    from transformers.cache_utils import Cache

    return any(isinstance(v, Cache) for v in (*args, *kwargs.values()))


# Every keyword a decoder layer takes its KV cache under (transformers 5.24+, the older names, GPT-2-like layers).
_LAYER_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _without_cache(layer: nn.Module, kwargs: dict) -> dict:
    """The layer's keyword arguments for a training step: no cache is written, as transformers' own gradient
    checkpointing does (``GradientCheckpointingLayer``); layers that only read their cache
    (``_can_checkpoint_with_cache``) keep it. A cache written in forward would hold every layer's keys and values
    until the step ends, the memory that checkpointing frees, and would be written again by the recomputation."""
    changed = []
    if kwargs.get("use_cache"):
        kwargs = {**kwargs, "use_cache": False}
        changed.append("use_cache=False")
    if not getattr(layer, "_can_checkpoint_with_cache", False):
        for name in _LAYER_CACHE_KEYWORDS:
            if kwargs.get(name) is not None:
                kwargs = {**kwargs, name: None}
                changed.append(f"{name}=None")
    if changed:
        _warn_once(f"'tiling' checkpointing runs the decoder layers of a training step without a KV cache "
                   f"({', '.join(changed)}), as transformers' gradient checkpointing does")
    return kwargs


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def _training_without_cache(model: nn.Module, inner):
    """The model's forward, with ``use_cache=False`` in a training step (``model.training`` with gradients enabled),
    as transformers sets it when its own gradient checkpointing is on: no cache is built, and packed documents
    (restarting ``position_ids``) get their block-diagonal mask, which transformers derives only without a cache."""

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if model.training and torch.is_grad_enabled() and kwargs.get("use_cache") is not False:
            if kwargs.get("use_cache") or text_config(model.config).use_cache:
                _warn_once("'tiling' checkpointing: a training step runs with use_cache=False, as transformers' "
                           "gradient checkpointing does")
            kwargs["use_cache"] = False
        return inner(*args, **kwargs)

    return forward


def checkpointed_layer(layer: nn.Module, inner, offload: bool):
    """The forward of a decoder ``layer`` (its original ``inner``) with gradient checkpointing of its input.

    In training (``layer.training`` with gradients enabled) the layer runs without a KV cache whatever the
    model's ``use_cache`` says, as transformers' own gradient checkpointing does: configs as shipped say
    ``use_cache: true``, and a cache would keep every layer's keys and values alive through the step. Outside
    training a layer given a cache runs as it is, without checkpointing."""

    @functools.wraps(inner)
    def forward(hidden_states, *args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(hidden_states, *args, **kwargs)
        if layer.training:
            kwargs = _without_cache(layer, kwargs)
        if _uses_cache(args, kwargs) and not (layer.training and getattr(layer, "_can_checkpoint_with_cache", False)):
            if layer.training:
                _warn_once(f"'tiling' checkpointing: {type(layer).__name__} was given a KV cache positionally in "
                           "training; the layer runs without checkpointing")
            return inner(hidden_states, *args, **kwargs)
        if getattr(layer, "gradient_checkpointing", False) and layer.training:
            raise RuntimeError("'tiling' with checkpointing: true already checkpoints every layer; turn off the "
                               "model's own gradient checkpointing (model.gradient_checkpointing_disable())")
        others = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.requires_grad]
        if others:
            raise RuntimeError("'tiling' checkpointing recomputes a layer from its hidden states alone, but another "
                               f"input of the layer needs a gradient (a tensor of shape {list(others[0].shape)})")
        rest: list | None = None  # a layer that returns (hidden_states, *others): the others, from the forward

        def run(h):
            nonlocal rest
            out = inner(h, *args, **kwargs)
            if isinstance(out, tuple):
                rest = rest if rest is not None else list(out[1:])
                out = out[0]
            return out

        out = _apply_function(_CheckpointedLayer, run, offload, hidden_states, layer)
        if rest is None:
            return out
        if any(isinstance(r, torch.Tensor) for r in rest):
            raise RuntimeError(f"'tiling' checkpointing recomputes a decoder layer from its hidden states, but "
                               f"{type(layer).__name__} also returns other tensors (attention weights? router "
                               "logits?), which would carry no gradient; set checkpointing: false")
        return (out, *rest)

    return forward


@torch.no_grad()
def _probe(mlp: nn.Module, hidden_size: int, index: int) -> None:
    """Refuse an MLP whose tiled output differs from its own (routing that depends on other tokens)."""
    weight = next(mlp.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4 * _PROBE_TILE + 1, hidden_size, generator=generator).to(weight.device, weight.dtype)
    own = mlp(x)
    if not isinstance(own, torch.Tensor):
        raise SpecError(f"'tiling' cannot tile the MLP of layer {index} ({type(mlp).__name__}): it returns "
                        f"{type(own).__name__}, not the hidden states alone")
    tiled = tiled_mlp(mlp, mlp.forward, _PROBE_TILE)(x)
    error = ((tiled.float() - own.float()).abs().max() / own.float().abs().max().clamp(min=1e-30)).item()
    tolerance = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 1e-2
    if error > tolerance:
        raise SpecError(f"'tiling' cannot tile the MLP of layer {index} ({type(mlp).__name__}): its output on a "
                        f"sequence differs from its output on pieces of it (relative difference {error:.2g}); "
                        "its tokens are not independent (e.g. an MoE with an expert capacity)")


def _mlps(model: nn.Module) -> list[nn.Module]:
    return [m for m in get_family(model).mlp_modules(model) if m is not None]


def _check(model: nn.Module, section: TilingSpec, spec) -> None:
    if section.mlp:
        mlps = _mlps(model)
        if not mlps:
            raise SpecError(f"'tiling' with mlp: true found no MLP in the layers of model_type "
                            f"'{model.config.model_type}'; set mlp: false to use checkpointing alone")
        if getattr(text_config(model.config), "output_router_logits", False):
            raise SpecError("'tiling' cannot tile MLPs whose router logits are returned for the router loss "
                            "(output_router_logits: true): the tiles run without gradients in forward; set "
                            "output_router_logits to false or mlp: false")
        was_training = model.training
        model.eval()
        try:
            seen: set[type] = set()
            for index, mlp in enumerate(mlps):
                if type(mlp) not in seen:
                    seen.add(type(mlp))
                    _probe(mlp, text_config(model.config).hidden_size, index)
        finally:
            model.train(was_training)


def _apply(model: nn.Module, section: TilingSpec, spec) -> Applied:
    wraps = []
    tile = section.mlp_tile_size or default_tile_sizes(model.config)["mlp_tile_size"]
    if section.mlp:
        wraps += [Wrap(mlp, "forward", lambda inner, mlp=mlp: tiled_mlp(mlp, inner, tile)) for mlp in _mlps(model)]
    if section.checkpointing:
        wraps += [Wrap(layer, "forward", lambda inner, layer=layer: checkpointed_layer(layer, inner, section.offload))
                  for layer in get_family(model).layers(model)]
        if "use_cache" in inspect.signature(type(model).forward).parameters:
            wraps.append(Wrap(model, "forward", lambda inner: _training_without_cache(model, inner)))
    logger.info("tiling: MLP %s, checkpointing %s, offload %s", f"in tiles of {tile} tokens" if section.mlp else "off",
                section.checkpointing, section.offload)
    return Applied(wraps=tuple(wraps))


register_technique(Technique(section="tiling", spec_class=TilingSpec, apply=_apply, check=_check, order=35))
