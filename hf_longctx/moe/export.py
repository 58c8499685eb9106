"""Native export of an upcycled model: Mixtral (llama, mistral), Qwen2-MoE (qwen2), Qwen3-MoE (qwen3).

The checkpoint is written by the native transformers model itself (built on the meta device,
given the upcycled tensors, then ``save_pretrained``), so plain ``AutoModelForCausalLM`` loads
it with the same logits, no plugin and no remote code. Its config is the dense config's
values for every key the native config has (``rope_parameters`` and ``max_position_embeddings``
of a RoPE patch included) plus the MoE keys; it carries no ``hf_longctx`` block, so
``hf_longctx.from_pretrained`` loads it as the native model too.

Qwen2-MoE always has a shared expert: it is written with ``shared_expert_intermediate_size = 0``
(an MLP of zero width, whose output is exactly zero). Layers left dense become
``mlp_only_layers`` in Qwen-MoE; Mixtral has no dense layers, so a partly upcycled llama or
mistral, a model carrying patches other than ``rope``, and a model whose weights the native
class cannot hold (biases) are saved in hf_longctx's own form instead (``save`` returns False).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..families import get_family
from ..patching import applied_sections, base_model
from .config import MoESpec

logger = logging.getLogger(__name__)

# Patches whose whole effect is in config values the native config also has.
_NATIVE_SECTIONS = {"moe", "rope"}
_NOT_COPIED = {"model_type", "architectures", "transformers_version", "_name_or_path", "auto_map"}


def _moe_keys(moe_type: str, section: MoESpec, expert_size: int, dense_size: int, dense_layers: list[int]):
    """The MoE config keys of ``moe_type``, or None if it cannot hold this layout."""
    common = dict(num_experts_per_tok=section.top_k, router_aux_loss_coef=section.router_aux_loss_coef)
    if moe_type == "mixtral":
        if dense_layers:
            return None
        return dict(common, num_local_experts=section.num_experts, intermediate_size=expert_size, router_jitter_noise=0.0)
    keys = dict(
        common,
        num_experts=section.num_experts,
        moe_intermediate_size=expert_size,
        intermediate_size=dense_size,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=dense_layers,
    )
    if moe_type == "qwen2_moe":
        keys["shared_expert_intermediate_size"] = 0
    return keys


def native_config(model: nn.Module, section: MoESpec):
    """The native MoE config of an upcycled ``model``, or None (with the reason logged)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    family = get_family(model)
    moe_type = family.moe_model_type
    layers = family.layers(model)
    upcycled = section.layer_indices(len(layers))
    dense_layers = [i for i in range(len(layers)) if i not in upcycled]
    experts = getattr(layers[upcycled[0]], family.mlp_attr).experts
    dense_size = getattr(model.config, "intermediate_size")
    moe = _moe_keys(moe_type, section, experts.down_proj.shape[-1], dense_size, dense_layers)
    if moe is None:
        logger.info("%s has no dense layers; layers %s stay dense, so hf_longctx's form is written", moe_type, dense_layers)
        return None
    config_class = CONFIG_MAPPING[moe_type]
    known = set(config_class().to_dict())
    source = model.config.to_dict()
    if "sliding_attention" in (source.get("layer_types") or []) and "layer_types" not in known:
        logger.info("%s has no per-layer attention types to hold %s; hf_longctx's form is written", moe_type,
                    source["layer_types"])
        return None
    values: dict[str, Any] = {k: v for k, v in source.items() if k in known and k not in _NOT_COPIED}
    values.update(moe)
    return config_class(**values)


def save_native(model: nn.Module, path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> bool:
    """The ``moe`` technique's save hook: write the native MoE checkpoint and return True, or return False.

    ``state_dict``: the weights to write (keys of ``model.state_dict()``), e.g. the full state dict
    gathered from FSDP shards on the main process; None takes the model's own.
    """
    target = base_model(model)
    sections = applied_sections(model)
    family = get_family(target)
    others = sorted(set(sections) - _NATIVE_SECTIONS)
    if family.moe_model_type is None or others or target is not model:
        logger.info(
            "no native MoE checkpoint for model_type '%s' with patches %s; hf_longctx's form is written",
            family.model_type, sorted(sections),
        )
        return False
    config = native_config(target, MoESpec.from_dict(sections["moe"]))
    if config is None:
        return False
    from transformers import AutoModelForCausalLM

    config.dtype = next(target.parameters()).dtype
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # the zero-width shared expert
        native = AutoModelForCausalLM.from_config(config)
    state = {k: v.detach() for k, v in (target.state_dict() if state_dict is None else state_dict).items()}
    device = next(iter(state.values())).device
    for name, param in native.named_parameters():
        if ".shared_expert" in name:  # zero-width shared expert (Qwen2-MoE), its gate at zero
            state[name] = torch.zeros(param.shape, dtype=param.dtype, device=device)
    missing, unexpected = (set(native.state_dict()) - set(state)), (set(state) - set(native.state_dict()))
    if missing or unexpected:
        logger.info(
            "%s cannot hold these weights (missing %s, unexpected %s); hf_longctx's form is written",
            type(native).__name__, sorted(missing)[:3], sorted(unexpected)[:3],
        )
        return False
    native.load_state_dict(state, assign=True, strict=True)
    native.save_pretrained(path, safe_serialization=True)
    name = type(target).__name__.removeprefix("FSDP")  # FSDP2 subclasses the model it wraps
    logger.info("saved %s as a native %s checkpoint in %s", name, type(native).__name__, path)
    return True
