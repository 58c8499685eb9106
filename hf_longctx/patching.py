"""patch / unpatch: validate a spec, dispatch each section to its technique, record, undo.

A technique registers itself here (``register_technique``) with the spec section it owns,
a ``check`` that validates the section against a model without touching it, and an
``apply`` that changes the model and returns how to undo the change. This module knows no
technique by name: it validates everything first, applies in order, rolls back on any
failure, and keeps what ``unpatch`` needs to put the model back bit for bit.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from .config_base import SectionSpec, SpecError
from .families import get_family

if TYPE_CHECKING:  # spec.py imports every technique's config, whose packages import this module
    from .spec import PatchSpec, SpecLike

logger = logging.getLogger(__name__)

STATE_ATTR = "_hf_longctx_state"


@dataclass
class Applied:
    """What applying one section did: how to undo it, and the model to hand back if it wraps."""

    undo: Callable[[], None]
    model: nn.Module | None = None  # a wrapper (RecurrentMemoryModel) that replaces the model for the caller


@dataclass
class Technique:
    section: str  # the spec section this technique owns
    apply: Callable[[nn.Module, SectionSpec, PatchSpec], Applied]
    check: Callable[[nn.Module, SectionSpec, PatchSpec], None] | None = None  # raise SpecError; never mutate
    order: int = 50  # application order: positions < attention < streaming < moe < memory (wrappers last)
    # Optional native export: write the whole checkpoint in another family's native form (MoE ->
    # Mixtral) and return True, or return False to let the default writer run. Called as
    # save(model, path, state_dict) with the state dict to write instead of the model's own
    # (None: the model's), e.g. the full one gathered from FSDP shards.
    save: Callable[[nn.Module, Path, dict[str, Any] | None], bool] | None = None
    # Optional native config: the config values that express this section in transformers' own
    # form (written only into the saved config.json), or None when there is none.
    native_config: Callable[[nn.Module, dict[str, Any]], dict[str, Any] | None] | None = None


def technique(section: str) -> Technique:
    return _TECHNIQUES[section]


@dataclass
class _PatchState:
    config_snapshot: dict[str, Any]  # the config as it was before the first patch
    applied: list[tuple[str, Applied]] = field(default_factory=list)


_TECHNIQUES: dict[str, Technique] = {}


def register_technique(technique: Technique) -> Technique:
    _TECHNIQUES[technique.section] = technique
    return technique


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a wrapper (``RecurrentMemoryModel``), or the model itself."""
    return getattr(model, "hf_longctx_base", model)


def applied_sections(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The sections recorded on ``model.config.hf_longctx`` (empty when unpatched)."""
    return dict(getattr(base_model(model).config, "hf_longctx", None) or {})


def patch(model: nn.Module, spec: SpecLike = None, **overrides: Any) -> nn.Module:
    """Apply ``spec`` to ``model`` in place and return it (or its memory wrapper).

    ``spec`` is a :class:`PatchSpec`, a dict of sections, a preset name or a YAML path;
    ``overrides`` replace whole sections (``patch(model, "yarn-4x", attention={...})``).
    Everything is validated before the model is touched; if applying any section fails,
    the sections applied so far are undone and the model is left exactly as it was.
    The applied sections are recorded as plain data on ``model.config.hf_longctx``.
    """
    from .spec import load_spec

    spec = load_spec(spec, **overrides)
    target = base_model(model)
    get_family(target)
    recorded = applied_sections(target)
    sections = spec.sections()
    for name, section in sections.items():
        if name in recorded:
            raise SpecError(f"section '{name}' is already applied to this model; call hf_longctx.unpatch(model) first")
        if name not in _TECHNIQUES:
            raise SpecError(f"section '{name}' is not available in this installation of hf_longctx")
    _check_combination(recorded, sections)
    ordered = sorted(sections.items(), key=lambda item: _TECHNIQUES[item[0]].order)
    for name, section in ordered:
        if _TECHNIQUES[name].check is not None:
            _TECHNIQUES[name].check(target, section, spec)

    state: _PatchState | None = getattr(target, STATE_ATTR, None)
    first_patch = state is None
    if first_patch:
        state = _PatchState(config_snapshot=copy.deepcopy(target.config.__dict__))
    config_before = copy.deepcopy(target.config.__dict__)
    done: list[tuple[str, Applied]] = []
    result = model
    try:
        for name, section in ordered:
            applied = _TECHNIQUES[name].apply(target, section, spec)
            done.append((name, applied))
            if applied.model is not None:
                result = applied.model
    except BaseException:
        for _, applied in reversed(done):
            applied.undo()
        _restore_config(target.config, config_before)
        raise
    state.applied.extend(done)
    object.__setattr__(target, STATE_ATTR, state)
    target.config.hf_longctx = {**recorded, **{name: sections[name].to_dict() for name, _ in ordered}}
    logger.info("hf_longctx: applied %s to %s", ", ".join(name for name, _ in ordered), type(target).__name__)
    return result


def unpatch(model: nn.Module) -> nn.Module:
    """Undo every patch: the original modules, config and behaviour (bit-identical logits)."""
    target = base_model(model)
    state: _PatchState | None = getattr(target, STATE_ATTR, None)
    if state is None:
        raise SpecError(f"{type(target).__name__} has not been patched by hf_longctx; nothing to undo")
    for _, applied in reversed(state.applied):
        applied.undo()
    _restore_config(target.config, state.config_snapshot)
    object.__delattr__(target, STATE_ATTR)
    return target


def _restore_config(config, snapshot: dict[str, Any]) -> None:
    # Modules keep references to the config object itself, so restore its contents in place.
    config.__dict__.clear()
    config.__dict__.update(copy.deepcopy(snapshot))


def _check_combination(recorded: dict[str, Any], sections: dict[str, SectionSpec]) -> None:
    """Cross-section rules that must also hold against what is already applied."""
    names = set(recorded) | set(sections)
    if {"rope", "alibi"} <= names:
        raise SpecError("'rope' and 'alibi' cannot be combined: ALiBi replaces the rotary embedding")
    if {"memory", "streaming"} <= names:
        raise SpecError("'memory' and 'streaming' cannot be combined: both own the way long inputs are split")
