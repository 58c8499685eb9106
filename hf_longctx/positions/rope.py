"""RoPE scaling: linear (PI), static NTK, dynamic NTK, YaRN, Llama 3 and LongRoPE.

The patch rewrites ``rope_parameters`` of the text config to the scaled form transformers
itself understands and rebuilds every rotary embedding of the model from it, so every type
that transformers has (``ROPE_INIT_FUNCTIONS``) keeps exactly transformers' semantics. Static
NTK has no rope type of its own in transformers: it becomes the default rotation with a larger
base, ``theta' = theta * factor ** (d / (d - 2))`` with ``d`` the rotary dimension.

Per-layer-type rotary (Gemma 3: ``rope_parameters`` keyed by layer type, one rotary module with a
``{layer_type}_inv_freq`` per type): ``rope.layer_types`` names the types to scale, by default
``full_attention``; the other types keep their rotation. NoPE layers stay NoPE (they never read
the rotary embedding) and partial rotary keeps its pass-through dimensions (the rotary dimension
is read off the module's ``inv_freq``). Rotary modules that carry their own copy of the config
(Granite SWA: one per theta) are rebuilt as the model builds them: from the scaled config with
their own theta.

The trained length is ``rope.original_max_position_embeddings`` or else the config's
``max_position_embeddings``. After the patch ``max_position_embeddings`` is the extended
length, except for ``dynamic``, whose transformers implementation reads the trained length
from ``max_position_embeddings`` and scales at run time.

Native export: the saved config.json holds the scaled ``rope_parameters`` whenever the model's
config class reads them back unchanged (plain transformers then loads the scaled model); a config
class that rewrites them (Phi-3 turns ``yarn`` into ``longrope``) gets the original values, and
``hf_longctx.from_pretrained`` re-applies the patch.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RotaryEmbeddingConfigMixin

from ..config_base import SpecError
from ..families import get_family, text_config
from ..patching import Applied, Technique, register_technique
from .config import RopeSpec

# model -> the text config's values before the patch: what a non-native save writes instead.
_ORIGINAL: "weakref.WeakKeyDictionary[nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()
_ROPE_KEYS = ("rope_parameters", "max_position_embeddings")


def trained_length(config, section: RopeSpec) -> int:
    return section.original_max_position_embeddings or config.max_position_embeddings


def scale_factor(config, section: RopeSpec) -> float:
    if section.factor is not None:
        return float(section.factor)
    return section.target_context / trained_length(config, section)


def nested_types(config) -> list[str]:
    """The layer types ``rope_parameters`` is keyed by (Gemma 3), or [] for one flat dict."""
    params = getattr(config, "rope_parameters", None) or {}
    return [key for key in params if isinstance(params[key], dict) or params[key] is None] if params else []


# Rope types whose frequencies transformers changes with the sequence length at run time.
LENGTH_DEPENDENT_TYPES = ("dynamic", "longrope")


def rope_types(config) -> set[str]:
    """The rope types of ``config``: one per layer type of a nested ``rope_parameters``, "default" when unset."""
    params = getattr(config, "rope_parameters", None) or {}
    nested = nested_types(config)
    return {p.get("rope_type", "default") for p in ([params[t] for t in nested if params[t]] if nested else [params])}


def scaled_types(model: nn.Module, section: RopeSpec) -> list[str] | None:
    """The layer types whose rotation the section scales, or None for a flat (one-rotation) config."""
    config = text_config(model)
    nested = nested_types(config)
    model_types = sorted(set(get_family(model).layer_types(model)))
    if not nested:
        if section.layer_types is not None and sorted(set(section.layer_types)) != model_types:
            raise SpecError(f"'rope.layer_types' = {section.layer_types!r}: this {config.model_type} model has one "
                            f"rotation for all its layers (types {model_types}); give all of them or leave the key out")
        return None
    chosen = section.layer_types or ["full_attention"]
    rotary = [t for t in nested if config.rope_parameters[t] is not None]
    unknown = [t for t in chosen if t not in rotary]
    if unknown:
        raise SpecError(f"'rope.layer_types' = {chosen!r} names {unknown[0]!r}; this model's rotary layer types "
                        f"are {rotary}")
    return chosen


def rotary_dims(model: nn.Module) -> dict[str | None, int]:
    """Rotary dimension per layer type (key None for a flat config), read off the rotary's ``inv_freq``."""
    rotary = get_family(model).rotary_embedding(model)
    dims = {}
    for name, buffer in rotary.named_buffers(recurse=False) if rotary is not None else ():
        if name == "inv_freq":
            dims[None] = 2 * buffer.shape[-1]
        elif name.endswith("_inv_freq") and not name.endswith(("original_inv_freq", "long_inv_freq")):
            dims[name[: -len("_inv_freq")]] = 2 * buffer.shape[-1]
    return dims


def _scaled_params(original: dict[str, Any], section: RopeSpec, trained: int, factor: float, dim: int) -> dict:
    """One ``rope_parameters`` dict (flat, or one layer type's) scaled by ``section``."""
    params = {k: v for k, v in original.items() if k in ("rope_theta", "partial_rotary_factor")}
    if section.type == "ntk":
        params.update(rope_type="default", rope_theta=original["rope_theta"] * factor ** (dim / (dim - 2)))
        return params
    params.update(rope_type=section.type, factor=factor)
    if section.type in ("linear", "dynamic"):
        return params
    params["original_max_position_embeddings"] = trained
    if section.type == "llama3":
        params.update(low_freq_factor=section.low_freq_factor, high_freq_factor=section.high_freq_factor)
    else:
        extra = section.to_dict()
        for key in ("type", "factor", "target_context", "original_max_position_embeddings", "layer_types"):
            extra.pop(key, None)
        params.update(extra)
    return params


def scaled_rope_config(model: nn.Module, section: RopeSpec) -> dict[str, Any]:
    """The text config's attributes (``rope_parameters``, ``max_position_embeddings``) after scaling."""
    config = text_config(model)
    trained = trained_length(config, section)
    factor = scale_factor(config, section)
    dims = rotary_dims(model)
    types = scaled_types(model, section)
    if types is None:
        params = _scaled_params(dict(config.rope_parameters), section, trained, factor, dims[None])
    else:
        params = copy.deepcopy(dict(config.rope_parameters))
        for layer_type in types:
            params[layer_type] = _scaled_params(params[layer_type], section, trained, factor, dims[layer_type])
    max_positions = trained if section.type == "dynamic" else int(round(trained * factor))
    return {"rope_parameters": params, "max_position_embeddings": max_positions}


def require_rotary(model: nn.Module) -> None:
    """Raise a SpecError unless the model has a rotary embedding and ``rope_parameters`` to patch."""
    family = get_family(model)
    if family.rotary_embedding(model) is None or not getattr(text_config(model), "rope_parameters", None):
        raise SpecError(
            f"model_type '{family.model_type}' has no rotary embedding to patch: no *RotaryEmbedding module under "
            f"its decoder ({type(family.decoder(model)).__name__}) or no config.rope_parameters; position patches "
            "apply to rotary models"
        )


def _rotaries(model: nn.Module) -> dict[str, tuple[nn.Module, Any]]:
    """path -> (rotary module, the config it reads) for every rotary embedding of the model."""
    shared = text_config(model)
    return {path: (module, getattr(module, "config", shared))
            for path, module in get_family(model).rotary_embeddings(model).items()}


def _rebuilt(model: nn.Module, section: RopeSpec) -> dict[str, nn.Module]:
    """path -> a fresh rotary module built from the scaled config (its own scaled copy where it has one).

    Reads the model's text config as it is now: call after setting the scaled values on it."""
    shared = text_config(model)
    fresh = {}
    for path, (module, config) in _rotaries(model).items():
        if config is not shared:
            # a copy with its own theta (Granite SWA): the scaled shared values, its own theta kept, as
            # the model builds such copies from a natively scaled config
            theta = config.rope_parameters.get("rope_theta")
            config = copy.deepcopy(config)
            for key in _ROPE_KEYS:
                setattr(config, key, copy.deepcopy(getattr(shared, key)))
            if theta is not None and "rope_theta" in config.rope_parameters:
                config.rope_parameters["rope_theta"] = theta
        buffers = list(module.buffers())
        device = buffers[0].device if buffers else None
        try:
            fresh[path] = type(module)(config=config).to(device)
            _run_once(fresh[path], device)
        except Exception as err:  # noqa: BLE001  any failure: this rotary cannot be rebuilt from a config
            raise SpecError(f"the rotary embedding at '{path}' ({type(module).__name__}) cannot be rebuilt from the "
                            f"scaled config ({type(err).__name__}: {err}); rope patches need rotary modules built "
                            "from config.rope_parameters") from err
    return fresh


def _run_once(rotary: nn.Module, device) -> None:
    """Run a rebuilt rotary on two positions (once per layer type it keeps frequencies for): a rotary that
    reads keys of its own from the scaled config (Phi-MoE's mscales) fails here, not in the model's forward."""
    x = torch.zeros(1, 1, 1, device=device)
    positions = torch.arange(2, device=device)[None]
    kinds = [name[: -len("_inv_freq")] for name, _ in rotary.named_buffers(recurse=False)
             if name.endswith("_inv_freq") and not name.endswith(("original_inv_freq", "long_inv_freq"))]
    for kind in kinds or [None]:
        rotary(x, positions) if kind is None else rotary(x, positions, layer_type=kind)


def _check(model: nn.Module, section: RopeSpec, spec) -> None:
    require_rotary(model)
    if model.config.get_text_config(decoder=True) is not model.config:
        raise SpecError(f"rope on '{model.config.model_type}' is not supported: its text model's config is a "
                        "sub-config of a multimodal one, whose rotary scaling is not checked")
    family = get_family(model)
    config = text_config(model)
    types = scaled_types(model, section)
    originals = [config.rope_parameters] if types is None else [config.rope_parameters[t] for t in types]
    for params in originals:
        if params.get("rope_type", "default") != "default":
            raise SpecError(f"the model already uses rope_type '{params['rope_type']}'; "
                            "hf_longctx scales models whose rope_type is 'default'")
    if family.rope_types is not None and section.type not in family.rope_types:
        raise SpecError(f"rope type '{section.type}' is not supported for model_type '{family.model_type}'; "
                        f"supported: {', '.join(family.rope_types)}")
    if section.type != "ntk" and section.type not in ROPE_INIT_FUNCTIONS:
        raise SpecError(f"rope type '{section.type}' is not provided by this transformers version")
    dims = rotary_dims(model)
    if section.type == "longrope":
        for layer_type in types or [None]:
            half = dims[layer_type] // 2
            for key in ("short_factor", "long_factor"):
                if len(getattr(section, key)) != half:
                    raise SpecError(f"'rope.{key}' has {len(getattr(section, key))} values; this model needs {half} "
                                    "(one per rotary frequency)")
    # transformers' own validation of the rope types (not a config class's narrower override, such as
    # Phi-3's default/longrope only: those types run in memory and are re-applied on load), on a copy.
    probe = copy.deepcopy(config)
    for key, value in scaled_rope_config(model, section).items():
        setattr(probe, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            RotaryEmbeddingConfigMixin.validate_rope(probe)
        except (ValueError, KeyError) as err:
            raise SpecError(f"invalid rope section {section.to_dict()}: {err}") from err


def _set_config(config, values: dict[str, Any]) -> None:
    for key, value in values.items():
        setattr(config, key, value)


def _apply(model: nn.Module, section: RopeSpec, spec) -> Applied:
    family = get_family(model)
    config = text_config(model)
    before = {key: copy.deepcopy(getattr(config, key)) for key in _ROPE_KEYS}
    _set_config(config, scaled_rope_config(model, section))
    try:
        fresh = _rebuilt(model, section)
    except BaseException:
        _set_config(config, before)
        raise
    originals = family.rotary_embeddings(model)
    for path, module in fresh.items():
        family.set_rotary_embedding(model, module, path)
    _ORIGINAL[model] = before

    def undo():
        # in place: attention modules and the rotary modules keep references to this config object
        _set_config(config, before)
        for path, module in originals.items():
            family.set_rotary_embedding(model, module, path)
        _ORIGINAL.pop(model, None)

    return Applied(undo=undo)


def round_trips(config) -> bool:
    """True when the config class reads this config's rope values back unchanged (its native form)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reloaded = type(config).from_dict(config.to_dict())
        except Exception:  # noqa: BLE001  a config class that refuses the values has no native form
            return False
    return all(getattr(reloaded, key, None) == getattr(config, key) for key in _ROPE_KEYS)


def _native_config(model: nn.Module, params: dict) -> dict | None:
    """None when the scaled rope is native (the config is written as it is); else the original values,
    which ``from_pretrained`` loads before re-applying the patch."""
    if model.config is not text_config(model) or round_trips(model.config):
        return None
    return copy.deepcopy(_ORIGINAL[model])


register_technique(Technique(section="rope", spec_class=RopeSpec, apply=_apply, check=_check, order=10,
                             native_config=_native_config))
