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

from torch import nn
from tqdm.auto import tqdm

from ..config_base import SpecError
from ..families import get_family
from ..patching import Applied, Technique, Wrap, patch, register_technique
from .config import MoESpec
from .export import save_native
from .layer import DENSE_LAYOUT, SparseMoeBlock
from .losses import with_router_losses

logger = logging.getLogger(__name__)


def _check(model: nn.Module, section: MoESpec, spec) -> None:
    family = get_family(model)
    num_layers = len(family.layers(model))
    indices = section.layer_indices(num_layers)
    bad = [i for i in indices if i >= num_layers]
    if bad:
        raise SpecError(f"'moe.layers' = {section.layers!r} names layer {bad[0]}; this model has layers 0..{num_layers - 1}")
    in_names, out_name, _ = DENSE_LAYOUT[family.mlp_kind]
    mlps = family.mlp_modules(model)
    for i in indices:
        mlp = mlps[i]
        if not all(isinstance(getattr(mlp, name, None), nn.Linear) for name in (*in_names, out_name)):
            raise SpecError(
                f"layer {i}'s MLP ({type(mlp).__name__}) is not a dense {family.mlp_kind} MLP with "
                f"{', '.join((*in_names, out_name))}; only dense MLPs can be upcycled"
            )
        intermediate = getattr(mlp, out_name).in_features
        if section.init == "partition" and intermediate % section.num_experts:
            raise SpecError(
                f"'moe.num_experts' = {section.num_experts} does not divide the intermediate size {intermediate} "
                f"of layer {i}; init 'partition' gives each expert an equal share of the neurons"
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
