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
(Granite SWA: one per theta, keyed by it) are rebuilt as the model builds them: from the scaled config
with their own theta; static NTK scales every base the config holds (``layer_rope_theta`` too).

The section scales relative to a base length: ``rope.original_max_position_embeddings`` if
given, else the model's current context ``max_position_embeddings`` (``mode: stack``, the
default), or its pre-extension length ``original_max_position_embeddings`` (``mode: replace``).
``target_context`` means factor = target / base length. After the patch ``max_position_embeddings``
is the extended length, except for ``dynamic``, whose transformers implementation reads the trained
length from ``max_position_embeddings`` and scales at run time.

A rope that is already scaled (Llama 3.x ``llama3``, Gemma 3's ``linear`` global layers, gpt-oss
``yarn``, Phi-3.5 ``longrope``) is stacked on in ``mode: stack``: the section divides the
frequencies the model uses now, per frequency, as :mod:`hf_longctx.positions.stacking` defines
(native form: a ``longrope`` with explicit factors and attention factor, or in memory where no
rope type expresses the result). ``mode: replace`` throws the shipped scaling away and scales the
unscaled frequencies from the original length.

Native export: the saved config.json holds the scaled ``rope_parameters`` whenever the model's
config class reads them back unchanged (plain transformers then loads the scaled model); a config
class that rewrites them (Phi-3 turns ``yarn`` into ``longrope``) gets the original values, and
``hf_longctx.from_pretrained`` re-applies the patch.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RotaryEmbeddingConfigMixin

from ..config_base import SpecError
from ..families import get_family, text_config
from ..patching import Applied, Technique, register_technique
from . import stacking
from .config import RopeSpec

# model -> the text config's values before the patch: what a non-native save writes instead.
_ORIGINAL: "weakref.WeakKeyDictionary[nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()
# models whose stacked rotation lives in memory only (no rope type of transformers expresses it)
_IN_MEMORY: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_ROPE_KEYS = ("rope_parameters", "max_position_embeddings")
# Phi-3 style configs keep the pre-extension length beside rope_parameters too (it wins on load); Granite SWA
# style configs a theta per layer that overrides rope_parameters' (0: NoPE), keying the rotary copies by it
_OPTIONAL_KEYS = ("original_max_position_embeddings", "layer_rope_theta")


def _keys(config) -> tuple[str, ...]:
    return _ROPE_KEYS + tuple(k for k in _OPTIONAL_KEYS if k in config.__dict__)


def original_length(config, params: dict | None = None) -> int:
    """The pre-extension context: ``original_max_position_embeddings`` of the rope (or the config), else
    ``max_position_embeddings``."""
    params = params if params is not None else (getattr(config, "rope_parameters", None) or {})
    return (params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
            or config.max_position_embeddings)


def _flat_or_scaled(config, section: RopeSpec) -> list[dict]:
    nested = nested_types(config)
    params = config.rope_parameters
    if not nested:
        return [params]
    return [params[t] for t in (section.layer_types or ["full_attention"]) if t in params and params[t]]


def trained_length(config, section: RopeSpec) -> int:
    """The length the section scales relative to (see the module docstring)."""
    if section.original_max_position_embeddings:
        return section.original_max_position_embeddings
    if section.mode == "replace":
        return max(original_length(config, p) for p in _flat_or_scaled(config, section))
    return config.max_position_embeddings


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


def length_dependent(model: nn.Module) -> bool:
    """Whether the model's rotary frequencies change with the sequence length (dynamic NTK, a LongRoPE whose
    two lists differ, a dynamic section stacked on a scaled rope)."""
    if _IN_MEMORY.get(model) == "length":
        return True
    config = text_config(model)
    params = getattr(config, "rope_parameters", None) or {}
    nested = nested_types(config)
    for p in ([params[t] for t in nested if params[t]] if nested else [params]):
        kind = p.get("rope_type", "default")
        if "dynamic" in kind or (kind == "longrope" and p.get("short_factor") != p.get("long_factor")):
            return True
    return False


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


def _ntk_theta(theta: float, factor: float, dim: int) -> float:
    """Static NTK's larger base for a rotary dimension ``dim``."""
    return theta * factor ** (dim / (dim - 2))


def _scaled_params(original: dict[str, Any], section: RopeSpec, trained: int, factor: float, dim: int) -> dict:
    """One ``rope_parameters`` dict (flat, or one layer type's) of an unscaled rope scaled by ``section``."""
    params = {k: v for k, v in original.items() if k in ("rope_theta", "partial_rotary_factor")}
    params.update(stacking.family_keys(original))
    if section.type == "ntk":
        params.update(rope_type="default", rope_theta=_ntk_theta(original["rope_theta"], factor, dim))
        return params
    params.update(rope_type=section.type, factor=factor)
    if section.type in ("linear", "dynamic"):
        return params
    params["original_max_position_embeddings"] = trained
    if section.type == "llama3":
        params.update(low_freq_factor=section.low_freq_factor, high_freq_factor=section.high_freq_factor)
    else:
        extra = section.to_dict()
        for key in ("type", "factor", "target_context", "original_max_position_embeddings", "layer_types", "mode"):
            extra.pop(key, None)
        params.update(extra)
    return params


@dataclass
class Plan:
    """What a rope section does to one model: the text config's new values, and for the layer types whose
    result no rope type expresses, the frequencies the rebuilt rotary modules get in memory."""

    values: dict[str, Any]
    in_memory: dict[str | None, stacking.Frequencies] = field(default_factory=dict)
    rules: dict[str | None, stacking.LengthRule] = field(default_factory=dict)  # frequencies that follow the length
    stacked: list[str] = field(default_factory=list)  # "<layer type>: <shipped type>" stacked on

    @property
    def kind(self) -> str | None:
        return "length" if self.rules else ("static" if self.in_memory else None)


def _rope_kwargs(layer_type: str | None) -> dict:
    return {} if layer_type is None else {"layer_type": layer_type}


def _native_stacked(model, config, rotary: nn.Module, params: dict, layer_type: str | None, section: RopeSpec,
                    result: stacking.Frequencies, context: int, factor: float, dim: int) -> dict | None:
    """The rope_parameters of a transformers rope type that rotates by ``result``, or None: each candidate
    is run in a rotary module of the model's own class (twice past its switch, as a long generation does)
    and kept only if it reproduces ``result``."""
    allowed = get_family(model).rope_types
    candidates = []
    shipped = params.get("rope_type", "default")
    if section.type == "linear" and shipped in ("linear", "proportional") and result.long is None:
        candidates.append({**params, "factor": params.get("factor", 1.0) * factor})
    if "partial_rotary_factor" not in params or shipped != "proportional":
        candidates.append(stacking.longrope_params(params, result, dim, context, int(round(context * factor))))
    for candidate in candidates:
        if allowed is not None and candidate["rope_type"] not in allowed:
            continue
        probe = copy.deepcopy(config)
        if layer_type is None:
            probe.rope_parameters = candidate
        else:
            probe.rope_parameters = {**probe.rope_parameters, layer_type: candidate}
        probe.max_position_embeddings = int(round(context * factor))
        if "original_max_position_embeddings" in probe.__dict__ and layer_type is None:
            probe.original_max_position_embeddings = candidate.get("original_max_position_embeddings",
                                                                   probe.original_max_position_embeddings)
        switch = result.switch if result.switch is not None else candidate.get("original_max_position_embeddings")
        checks = [(2, result.short)]
        if switch is not None:
            checks += [(switch + 2, result.at_context())] * 2
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = type(rotary)(config=probe)
                ok = True
                for length, wanted in checks:
                    got, attention = _effective(module, layer_type, length)
                    ok = ok and stacking.same_rotation(got, wanted) and abs(attention - result.attention) <= 1e-9
        except Exception:  # noqa: BLE001  a candidate this transformers cannot run is not a native form
            continue
        if ok:
            return candidate
    return None


def _effective(rotary: nn.Module, layer_type: str | None, length: int) -> tuple[torch.Tensor, float]:
    """The frequencies and attention factor a rotary module uses for a sequence of ``length`` tokens."""
    prefix = "" if layer_type is None else f"{layer_type}_"
    with torch.no_grad():
        rotary(torch.zeros(1, 1, 1), torch.tensor([[0, length - 1]]), **_rope_kwargs(layer_type))
    return getattr(rotary, f"{prefix}inv_freq"), float(getattr(rotary, f"{prefix}attention_scaling", 1.0))


def _plan(model: nn.Module, section: RopeSpec) -> Plan:
    """The config values (and in-memory frequencies) of ``section`` on this model; SpecError if not exact."""
    config = text_config(model)
    trained = trained_length(config, section)
    factor = scale_factor(config, section)
    dims = rotary_dims(model)
    types = scaled_types(model, section)
    rotaries = get_family(model).rotary_embeddings(model)
    rotary = next(iter(rotaries.values()))
    new_context = trained if section.type == "dynamic" else int(round(trained * factor))
    plan = Plan(values={"rope_parameters": copy.deepcopy(dict(config.rope_parameters)),
                        "max_position_embeddings": new_context})
    for layer_type in types or [None]:
        params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
        shipped = params.get("rope_type", "default")
        if section.mode == "replace" or shipped == "default":
            scaled = _scaled_params(params, section, trained, factor, dims[layer_type])
        else:
            scaled = _stacked_params(model, config, rotary, params, layer_type, section, plan, trained, factor,
                                     dims[layer_type])
            plan.stacked.append(f"{layer_type or 'all layers'}: {shipped}")
            if len({id(getattr(m, 'config', config)) for m in rotaries.values()}) > 1:
                raise SpecError("stacking on a scaled rope is not supported on models whose rotary embeddings carry "
                                "configs of their own (one per theta); use mode: replace")
        if layer_type is None:
            plan.values["rope_parameters"] = scaled
        else:
            plan.values["rope_parameters"][layer_type] = scaled
    thetas = getattr(config, "layer_rope_theta", None)
    if thetas and section.type == "ntk" and types is None:  # every layer's base, as the flat one
        plan.values["layer_rope_theta"] = [_ntk_theta(t, factor, dims[None]) if t else t for t in thetas]
    switch = plan.values["rope_parameters"].get("original_max_position_embeddings") if types is None else None
    if "original_max_position_embeddings" in config.__dict__ and switch is not None and not plan.kind:
        plan.values["original_max_position_embeddings"] = switch  # Phi-3: the top-level value wins on load
    return plan


def _stacked_params(model, config, rotary, params, layer_type, section, plan: Plan, context, factor, dim) -> dict:
    """rope_parameters of one layer type after stacking ``section`` on its shipped scaling (the shipped ones
    where the result is held in memory, recorded on ``plan``)."""
    current = stacking.current_frequencies(rotary, config, params, layer_type)
    if section.type == "dynamic" or (section.type == "longrope" and current.long is not None):
        plan.rules[layer_type] = stacking.length_rule(section, current, context, factor)
        return params
    result = stacking.stacked(section, current, context, factor)
    native = _native_stacked(model, config, rotary, params, layer_type, section, result, context, factor, dim)
    if native is not None:
        return native
    if result.long is not None:  # a switch that only longrope holds, and longrope does not run here
        plan.rules[layer_type] = stacking.length_rule(section, current, context, factor)
    else:
        plan.in_memory[layer_type] = result
    return params


def scaled_rope_config(model: nn.Module, section: RopeSpec) -> dict[str, Any]:
    """The text config's attributes (``rope_parameters``, ``max_position_embeddings``) after scaling."""
    return _plan(model, section).values


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


def _rebuilt(model: nn.Module, before: dict[str, Any]) -> dict[str, nn.Module]:
    """path -> a fresh rotary module built from the scaled config (its own scaled copy where it has one).

    Reads the model's text config as it is now: call after setting the scaled values on it; ``before`` holds
    its values before (a rotary whose config copy has the same theta as they had simply takes the new ones)."""
    shared = text_config(model)
    shared_theta = (before["rope_parameters"] or {}).get("rope_theta")
    # a theta per layer (Granite SWA), scaled where the section moves the base (ntk): old -> new
    thetas = dict(zip(before.get("layer_rope_theta") or (), getattr(shared, "layer_rope_theta", None) or ()))
    fresh = {}
    for path, (module, config) in _rotaries(model).items():
        if config is not shared and config.rope_parameters.get("rope_theta") == shared_theta:
            config = shared
        if config is not shared:
            # a copy with its own theta (Granite SWA): the scaled shared values and its own theta, as the
            # model builds such copies from a natively scaled config (which keys them by that theta)
            theta = config.rope_parameters.get("rope_theta")
            theta = thetas.get(theta, theta)
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


# ---------------------------------------------------------------- stacked rotations held in memory


def _set_frequencies(rotary: nn.Module, layer_type: str | None, inv_freq: torch.Tensor,
                     attention: float | None = None) -> None:
    prefix = "" if layer_type is None else f"{layer_type}_"
    for name in (f"{prefix}inv_freq", f"{prefix}original_inv_freq"):
        buffer = getattr(rotary, name, None)
        if isinstance(buffer, torch.Tensor):
            buffer.copy_(inv_freq.to(buffer.dtype))
    if attention is not None:
        setattr(rotary, f"{prefix}attention_scaling", attention)


class _LengthRuled:
    """Mixin of a rotary class: the frequencies of a :class:`stacking.LengthRule` per layer type, set before each
    call, with dynamic NTK's caching as transformers does it (the frequencies of the longest sequence seen
    beyond the context; back to the base ones below it). Those layer types read as ``default`` to transformers'
    own update, which would otherwise overwrite them."""

    _hf_longctx_rules: dict

    @torch.no_grad()
    def forward(self, x, position_ids, *args, **kwargs):
        layer_type = kwargs.get("layer_type", args[0] if args else None)
        state = self._hf_longctx_rules.get(layer_type)
        if state is not None:
            rule, length = state["rule"], int(position_ids.max()) + 1
            if rule.dynamic:
                if length > state["cached"]:
                    state["cached"] = length
                elif length < rule.context < state["cached"]:
                    state["cached"] = rule.context
                if state["cached"] > rule.context:
                    length = state["cached"]
            _set_frequencies(self, layer_type, rule.at(length))
        return super().forward(x, position_ids, *args, **kwargs)


_RULED_CLASSES: dict[type, type] = {}


def _ruled_class(cls: type) -> type:
    if cls not in _RULED_CLASSES:  # same name: the module is found and reported as the family's rotary
        _RULED_CLASSES[cls] = type(cls.__name__, (_LengthRuled, cls), {"__module__": cls.__module__})
    return _RULED_CLASSES[cls]


def _hold_in_memory(fresh: dict[str, nn.Module], plan: Plan) -> None:
    for module in fresh.values():
        for layer_type, result in plan.in_memory.items():
            _set_frequencies(module, layer_type, result.short, result.attention)
        if not plan.rules:
            continue
        module.__class__ = _ruled_class(type(module))
        module._hf_longctx_rules = {}
        for layer_type, rule in plan.rules.items():
            module._hf_longctx_rules[layer_type] = {"rule": rule, "cached": rule.context}
            _set_frequencies(module, layer_type, rule.at(1), rule.attention)
            if layer_type is None:
                module.rope_type = "default"
            else:
                module.rope_type = {**module.rope_type, layer_type: "default"}


# ---------------------------------------------------------------- the technique


def _check(model: nn.Module, section: RopeSpec, spec) -> None:
    require_rotary(model)
    family = get_family(model)
    config = text_config(model)
    if family.rope_types is not None and section.type not in family.rope_types:
        raise SpecError(f"rope type '{section.type}' is not supported for model_type '{family.model_type}'; "
                        f"supported: {', '.join(family.rope_types)}")
    if section.type != "ntk" and section.type not in ROPE_INIT_FUNCTIONS:
        raise SpecError(f"rope type '{section.type}' is not provided by this transformers version")
    types = scaled_types(model, section)
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
    for key, value in _plan(model, section).values.items():
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
    plan = _plan(model, section)
    before = {key: copy.deepcopy(getattr(config, key)) for key in _keys(config)}
    _set_config(config, plan.values)
    try:
        fresh = _rebuilt(model, before)
        _hold_in_memory(fresh, plan)
    except BaseException:
        _set_config(config, before)
        raise
    originals = family.rotary_embeddings(model)
    for path, module in fresh.items():
        family.set_rotary_embedding(model, module, path)
    _ORIGINAL[model] = before
    if plan.kind:
        _IN_MEMORY[model] = plan.kind

    def undo():
        # in place: attention modules and the rotary modules keep references to this config object
        _set_config(config, before)
        for path, module in originals.items():
            family.set_rotary_embedding(model, module, path)
        _ORIGINAL.pop(model, None)
        _IN_MEMORY.pop(model, None)

    return Applied(undo=undo)


def round_trips(config) -> bool:
    """True when the config class reads this config's rope values back unchanged (its native form); for a
    multimodal config, its text sub-config's values."""
    text = config.get_text_config(decoder=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reloaded = type(config).from_dict(config.to_dict()).get_text_config(decoder=True)
        except Exception:  # noqa: BLE001  a config class that refuses the values has no native form
            return False
    return all(getattr(reloaded, key, None) == getattr(text, key) for key in _keys(text))


def native(model: nn.Module) -> bool:
    """Whether plain transformers reproduces the patched rope from the saved config."""
    return model not in _IN_MEMORY and round_trips(model.config)


def _native_config(model: nn.Module, params: dict) -> dict | None:
    """None when the scaled rope is native (the config is written as it is); else the original values,
    which ``from_pretrained`` loads before re-applying the patch."""
    if native(model):
        return None
    text = text_config(model)
    if model.config is text:
        return copy.deepcopy(_ORIGINAL[model])
    original = copy.deepcopy(text)
    _set_config(original, copy.deepcopy(_ORIGINAL[model]))
    key = next(k for k, v in model.config.__dict__.items() if v is text)
    return {key: original}


def _card(params: dict, model: nn.Module | None = None) -> list[str]:
    if model is None or native(model):
        return []
    return ["- **RoPE:** the scaled rotation has no transformers rope type (a dynamic section stacked on a scaled "
            "rope, a longrope section on a LongRoPE, or a per-frequency scaling of a rope type that has no "
            "per-frequency form): `config.json` keeps "
            "the original rope, and `hf_longctx.from_pretrained` re-applies the section; plain "
            "`AutoModelForCausalLM.from_pretrained` loads the unscaled model"]


register_technique(Technique(section="rope", spec_class=RopeSpec, apply=_apply, check=_check, order=10,
                             native_config=_native_config, card=_card))
