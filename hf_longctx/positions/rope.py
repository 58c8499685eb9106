"""RoPE scaling: linear (PI), static NTK, dynamic NTK, YaRN, Llama 3 and LongRoPE.

The patch rewrites ``config.rope_parameters`` to the scaled form transformers itself
understands and rebuilds the model's rotary embedding from it, so every type that
transformers has (``ROPE_INIT_FUNCTIONS``) keeps exactly transformers' semantics and the
saved config is the native checkpoint. Static NTK has no rope type of its own in
transformers: it becomes the default rotation with a larger base,
``theta' = theta * factor ** (d / (d - 2))`` with ``d`` the rotary dimension.

The trained length is ``rope.original_max_position_embeddings`` or else the config's
``max_position_embeddings``. After the patch ``max_position_embeddings`` is the extended
length, except for ``dynamic``, whose transformers implementation reads the trained length
from ``max_position_embeddings`` and scales at run time.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..config_base import SpecError
from ..families import get_family, supported_model_types
from ..patching import Applied, Technique, register_technique
from .config import RopeSpec


def trained_length(config, section: RopeSpec) -> int:
    return section.original_max_position_embeddings or config.max_position_embeddings


def rotary_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))


def scale_factor(config, section: RopeSpec) -> float:
    if section.factor is not None:
        return float(section.factor)
    return section.target_context / trained_length(config, section)


def scaled_rope_config(config, section: RopeSpec) -> dict[str, Any]:
    """The config attributes (``rope_parameters``, ``max_position_embeddings``) after scaling."""
    original = dict(config.rope_parameters)
    trained = trained_length(config, section)
    factor = scale_factor(config, section)
    params = {k: v for k, v in original.items() if k in ("rope_theta", "partial_rotary_factor")}
    max_positions = int(round(trained * factor))
    if section.type == "ntk":
        d = rotary_dim(config)
        params.update(rope_type="default", rope_theta=original["rope_theta"] * factor ** (d / (d - 2)))
    elif section.type == "dynamic":
        params.update(rope_type="dynamic", factor=factor)
        max_positions = trained
    else:
        params.update(rope_type=section.type, factor=factor)
        if section.type != "linear":
            params["original_max_position_embeddings"] = trained
        extra = section.to_dict()
        for key in ("type", "factor", "target_context", "original_max_position_embeddings"):
            extra.pop(key, None)
        if section.type == "llama3":
            extra = {"low_freq_factor": section.low_freq_factor, "high_freq_factor": section.high_freq_factor}
        params.update(extra)
    return {"rope_parameters": params, "max_position_embeddings": max_positions}


def require_rotary(model: nn.Module) -> None:
    """Raise a SpecError listing the supported families unless the model has a rotary embedding."""
    rotary = get_family(model).rotary_embedding(model)
    if rotary is None or not getattr(model.config, "rope_parameters", None):
        raise SpecError(
            f"model_type '{model.config.model_type}' has no rotary embedding to patch; "
            f"position patches apply to: {', '.join(supported_model_types())}"
        )


def _check(model: nn.Module, section: RopeSpec, spec) -> None:
    require_rotary(model)
    rope_parameters = model.config.rope_parameters
    if rope_parameters.get("rope_type", "default") != "default":
        raise SpecError(
            f"the model already uses rope_type '{rope_parameters['rope_type']}'; "
            "hf_longctx scales models whose rope_type is 'default'"
        )
    allowed = get_family(model).rope_types
    if allowed is not None and section.type not in allowed:
        raise SpecError(
            f"rope type '{section.type}' is not supported for model_type '{model.config.model_type}', "
            f"whose transformers config accepts only: {', '.join(allowed)}"
        )
    if section.type not in ("ntk",) and section.type not in ROPE_INIT_FUNCTIONS:
        raise SpecError(f"rope type '{section.type}' is not provided by this transformers version")
    if section.type == "longrope":
        half = rotary_dim(model.config) // 2
        for key in ("short_factor", "long_factor"):
            if len(getattr(section, key)) != half:
                raise SpecError(
                    f"'rope.{key}' has {len(getattr(section, key))} values; this model needs {half} "
                    "(one per rotary frequency)"
                )
    # Let transformers validate the result on a copy, so its errors surface before any change.
    probe = copy.deepcopy(model.config)
    for key, value in scaled_rope_config(model.config, section).items():
        setattr(probe, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            probe.validate_rope()
        except (ValueError, KeyError) as err:
            raise SpecError(f"invalid rope section {section.to_dict()}: {err}") from err


def rebuild_rotary_embedding(model: nn.Module) -> nn.Module:
    """Replace the model's rotary embedding by a fresh one built from its (patched) config.

    Returns the original module, for undo.
    """
    family = get_family(model)
    original = family.rotary_embedding(model)
    device = original.inv_freq.device
    fresh = type(original)(config=original.config).to(device)
    family.set_rotary_embedding(model, fresh)
    return original


def _apply(model: nn.Module, section: RopeSpec, spec) -> Applied:
    family = get_family(model)
    for key, value in scaled_rope_config(model.config, section).items():
        setattr(model.config, key, value)
    original = rebuild_rotary_embedding(model)
    return Applied(undo=lambda: family.set_rotary_embedding(model, original))


register_technique(Technique(section="rope", spec_class=RopeSpec, apply=_apply, check=_check, order=10))
