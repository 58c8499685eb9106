"""The ``moe`` technique: replace dense MLPs by sparse MoE blocks initialised from them.

``patch(model, {"moe": {...}})`` (or :func:`upcycle_moe`) swaps the MLP of each chosen layer
for a :class:`~hf_longctx.moe.layer.SparseMoeBlock`, contributes a wrapper of the causal LM's
``forward`` to the call path that reports and trains the router losses (see ``losses.py``), and
writes ``router_aux_loss_coef`` / ``router_z_loss_coef`` on the config. ``unpatch`` puts the dense
MLPs and the config back. ``save_pretrained`` writes a native Mixtral / Qwen2-MoE /
Qwen3-MoE checkpoint where one exists (``export.py``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from ..config_base import SpecError
from ..families import get_family
from ..patching import Applied, Technique, Wrap, patch, register_technique
from .config import MoESpec
from .export import save_native
from .layer import DenseMLP, SparseMoeBlock
from .losses import with_router_losses

logger = logging.getLogger(__name__)


def _is_mixture(mlp: nn.Module) -> bool:
    """True for an MLP that already routes tokens to experts (Mixtral, Qwen-MoE, gpt-oss, ...)."""
    return any(name.rpartition(".")[2] in ("experts", "router") or "moe" in type(m).__name__.lower()
               for name, m in mlp.named_modules())


def _check_reproduces(mlp: nn.Module, dense: DenseMLP, index: int) -> None:
    """Refuse an MLP whose output is not ``dense``'s (an extra norm, scale or residual inside it):
    the experts would compute something else. Runs the MLP once on 4 random tokens in eval mode."""
    weight = dense.in_proj
    if weight.is_meta or isinstance(weight.data, DTensor):
        return  # meta or sharded weights: nothing to run
    probe = torch.randn(1, 4, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    training = mlp.training
    try:
        mlp.eval()
        with torch.no_grad():
            theirs, ours = mlp(probe), dense.forward(probe)
    except Exception as err:  # noqa: BLE001  any failure means the MLP is not the plain form
        raise SpecError(f"layer {index}'s MLP ({type(mlp).__name__}) cannot be run on its own "
                        f"({type(err).__name__}: {err}); only dense MLPs of a known form can be upcycled") from err
    finally:
        mlp.train(training)
    tolerance = (1e-4 if weight.dtype == torch.float32 else 2e-2) * max(1.0, ours.abs().max().item())
    if not torch.is_tensor(theirs) or theirs.shape != ours.shape or (theirs - ours).abs().max() > tolerance:
        raise SpecError(f"layer {index}'s MLP ({type(mlp).__name__}) computes more than "
                        f"{'act(gate) * up' if dense.gated else 'act(in)'} -> out (e.g. a norm inside it); "
                        "upcycling it would change the model")


def _check(model: nn.Module, section: MoESpec, spec) -> None:
    family = get_family(model)
    num_layers = len(family.layers(model))
    indices = section.layer_indices(num_layers)
    bad = [i for i in indices if i >= num_layers]
    if bad:
        raise SpecError(f"'moe.layers' = {section.layers!r} names layer {bad[0]}; this model has layers 0..{num_layers - 1}")
    mlps = family.mlp_modules(model)
    for i in indices:
        mlp = mlps[i]
        if _is_mixture(mlp):
            raise SpecError(f"layer {i}'s MLP ({type(mlp).__name__}) is already a mixture of experts; "
                            "'moe' upcycles dense MLPs")
        try:
            dense = DenseMLP.from_module(mlp, family.mlp_kind)
        except ValueError as err:
            raise SpecError(f"layer {i}'s MLP cannot be upcycled: {err}") from err
        _check_reproduces(mlp, dense, i)
        if section.init == "partition" and dense.intermediate_size % section.num_experts:
            raise SpecError(
                f"'moe.num_experts' = {section.num_experts} does not divide the intermediate size "
                f"{dense.intermediate_size} of layer {i}; init 'partition' gives each expert an equal share of the neurons"
            )


def _apply(model: nn.Module, section: MoESpec, spec) -> Applied:
    family = get_family(model)
    layers = family.layers(model)
    indices = section.layer_indices(len(layers))
    router_std = getattr(model.config, "initializer_range", 0.02)
    originals: dict[int, nn.Module] = {}

    def undo():
        for i, mlp in originals.items():
            setattr(layers[i], family.mlp_attr, mlp)

    try:
        for i in tqdm(indices, desc=f"upcycling MLPs to {section.num_experts} experts", disable=None):
            mlp = getattr(layers[i], family.mlp_attr)
            block = SparseMoeBlock.from_dense(
                mlp, family.mlp_kind, section.num_experts, section.top_k, section.init, section.noise, router_std
            )
            originals[i] = mlp
            setattr(layers[i], family.mlp_attr, block)
    except BaseException:
        undo()
        raise
    routers = [getattr(layers[i], family.mlp_attr).gate for i in indices]
    model.config.router_aux_loss_coef = section.router_aux_loss_coef
    model.config.router_z_loss_coef = section.router_z_loss_coef
    logger.info("upcycled %d MLPs of %s to %d experts (top %d)", len(indices), type(model).__name__,
                section.num_experts, section.top_k)
    router_losses = functools.partial(with_router_losses, model, routers=routers, num_experts=section.num_experts,
                                      top_k=section.top_k)
    return Applied(undo=undo, wraps=(Wrap(model, "forward", router_losses),))


register_technique(Technique(section="moe", spec_class=MoESpec, apply=_apply, check=_check, order=40, save=save_native))


def upcycle_moe(
    model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    layers: Literal["all"] | list[int] = "all",
    init: Literal["copy", "partition"] = "copy",
    noise: float = 0.0,
    **options: Any,
) -> nn.Module:
    """Upcycle the dense MLPs of ``model`` into sparse MoE layers, in place; returns the model.

    Same as ``patch(model, {"moe": {...}})``; ``options`` are the other keys of the ``moe``
    section (``router_aux_loss_coef``, ``router_z_loss_coef``). ``init="copy"`` makes every expert
    a copy of the MLP (plus ``noise``), ``init="partition"`` splits its neurons among the experts.
    """
    section = dict(num_experts=num_experts, top_k=top_k, layers=layers, init=init, noise=noise, **options)
    return patch(model, {"moe": section})
