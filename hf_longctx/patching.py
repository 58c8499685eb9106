"""patch / unpatch: validate a spec, apply its sections, own the model's call path, undo.

Techniques. Each technique registers itself (:func:`register_technique`) with the spec
section it owns, the dataclass of that section, a ``check`` that validates the section
against a model without touching it, an ``apply`` that changes the model and says how to
undo it, and a unique ``order``. This module knows no technique by name: it validates
everything first, applies in order, rolls back on any failure, and keeps what ``unpatch``
needs to put the model back bit for bit.

The call path. No technique assigns ``forward`` or ``generate`` itself. ``apply`` returns
:class:`Wrap` contributions (a module, a method name, and a wrapper ``inner -> outer`` with
the same call signature); this module keeps one chain per (module, method), installs it on
the instance with the first contribution and removes it with the last. Wrappers nest by
their technique's order, the lowest innermost, so the call path is the same whatever order
``patch()`` calls came in::

    order  section    contributes
    -----  ---------  ------------------------------------------------------------------------
      10   rope       rebuilt rotary embedding (no wrapper)
      15   alibi      identity rotary + bias through the attention interface (no wrapper)
      20   attention  attention + mask functions (AttentionInterface), sink parameters
      22   extend     Self-Extend / Dual Chunk Attention: position remapping in an attention function
      30   loss       model.forward: with labels, the model's own forward, its loss_function returning
                      the chunked loss (router losses stay the model's own); output head forward:
                      computes that loss in its one call (FSDP hooks run on the head), returns an
                      empty placeholder for the logits
      35   tiling     MLPs computed in sequence tiles; decoder layers checkpointed (optionally offloaded);
                      with checkpointing, model.forward: use_cache=False in a training step
      40   moe        model.forward: router losses added to the loss, router logits in the output
      50   streaming  model.forward: a SinkCache feeds the input in the cache position frame;
                      model.generate: a SinkCache unless a cache is given
      90   memory     wraps the model in a RecurrentMemoryModel (returned by patch)

    model(ids, labels=y)  ->  streaming( moe( loss( <class forward> ) ) )(ids, labels=y)

``unpatch`` removes every contribution and undoes the sections in reverse order of
application; the model is left without any instance attribute of hf_longctx.
"""

from __future__ import annotations

import bisect
import copy
import functools
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from torch import nn
from transformers import PreTrainedConfig

from .config_base import SECTION_CLASSES, SectionSpec, SpecError
from .families import get_family

if TYPE_CHECKING:  # spec.py needs no technique, but keep the import graph one-way at run time
    from .spec import PatchSpec, SpecLike

logger = logging.getLogger(__name__)

STATE_ATTR = "_hf_longctx_state"

Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]  # inner callable -> outer callable, same signature


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Wrap:
    """One contribution to a call path: ``owner.method`` becomes ``wrapper(<the inner call>)``."""

    owner: nn.Module  # the causal LM, or one of its modules (the output head)
    method: str  # "forward" or "generate"
    wrapper: Wrapper


@dataclass
class Applied:
    """What applying one section did: its undo, its call-path contributions, the model to hand back if it wraps."""

    undo: Callable[[], None] = _nothing
    wraps: tuple[Wrap, ...] = ()
    model: nn.Module | None = None  # a wrapper (RecurrentMemoryModel) that replaces the model for the caller


@dataclass(frozen=True)
class Technique:
    section: str  # the spec section this technique owns
    spec_class: type[SectionSpec]  # the dataclass of that section
    apply: Callable[[nn.Module, SectionSpec, PatchSpec], Applied]
    order: int  # unique; application order and nesting of the call-path wrappers (see the module docstring)
    check: Callable[[nn.Module, SectionSpec, PatchSpec], None] | None = None  # raise SpecError; never mutate
    # Optional native export: write the whole checkpoint in another family's native form (MoE ->
    # Mixtral) and return True, or return False to let the default writer run. Called as
    # save(model, path, state_dict) with the state dict to write instead of the model's own
    # (None: the model's), e.g. the full one gathered from FSDP shards.
    save: Callable[[nn.Module, Path, dict[str, Any] | None], bool] | None = None
    # Optional native config: the config values that express this section in transformers' own
    # form (written only into the saved config.json), or None when there is none.
    native_config: Callable[[nn.Module, dict[str, Any]], dict[str, Any] | None] | None = None
    # Optional model-card lines describing the applied section: card(recorded parameters, patched model).
    card: Callable[[dict[str, Any], nn.Module], list[str]] | None = None


_TECHNIQUES: dict[str, Technique] = {}


def register_technique(technique: Technique) -> Technique:
    """Make a technique (and its spec section) known; its section name and order must be new."""
    if technique.section in _TECHNIQUES:
        raise ValueError(f"a technique for section '{technique.section}' is already registered")
    taken = {t.order: t.section for t in _TECHNIQUES.values()}
    if technique.order in taken:
        raise ValueError(f"order {technique.order} of '{technique.section}' is taken by '{taken[technique.order]}'")
    if technique.spec_class.section != technique.section:
        raise ValueError(f"{technique.spec_class.__name__} is the section '{technique.spec_class.section}', "
                         f"not '{technique.section}'")
    _TECHNIQUES[technique.section] = technique
    ordered = sorted(_TECHNIQUES.values(), key=lambda t: t.order)
    SECTION_CLASSES.clear()
    SECTION_CLASSES.update((t.section, t.spec_class) for t in ordered)
    return technique


def technique(section: str) -> Technique:
    return _TECHNIQUES[section]


class _CallChain:
    """The instance-level replacement of ``owner.method``: the wrappers, by order, around the original."""

    def __init__(self, owner: nn.Module, method: str):
        self.owner, self.method = owner, method
        self.saved = owner.__dict__.get(method)  # an instance attribute the user had set, put back at the end
        self.original = getattr(owner, method)
        self.wrappers: list[tuple[int, Wrapper]] = []
        self.composed = self.original

        @functools.wraps(self.original)  # keeps the signature that generate() and the Trainer inspect
        def call(*args, **kwargs):
            return self.composed(*args, **kwargs)

        owner.__dict__[method] = call

    def add(self, order: int, wrapper: Wrapper) -> None:
        bisect.insort(self.wrappers, (order, wrapper), key=lambda item: item[0])
        self._compose()

    def remove(self, wrapper: Wrapper) -> None:
        self.wrappers = [item for item in self.wrappers if item[1] is not wrapper]
        self._compose()

    def _compose(self) -> None:
        composed = self.original
        for _, wrapper in self.wrappers:
            composed = wrapper(composed)
        self.composed = composed

    def uninstall(self) -> None:
        if self.saved is None:
            del self.owner.__dict__[self.method]
        else:
            self.owner.__dict__[self.method] = self.saved


@dataclass
class _PatchState:
    config_snapshot: dict[str, Any]  # the config as it was before the first patch
    applied: list[tuple[str, Applied]] = field(default_factory=list)
    chains: dict[tuple[int, str], _CallChain] = field(default_factory=dict)

    def add_wraps(self, order: int, applied: Applied) -> None:
        for wrap in applied.wraps:
            key = (id(wrap.owner), wrap.method)
            if key not in self.chains:
                self.chains[key] = _CallChain(wrap.owner, wrap.method)
            self.chains[key].add(order, wrap.wrapper)

    def __deepcopy__(self, memo):
        # The contributions hold the patched model itself: a copy would run the original's call path.
        raise TypeError("a model patched by hf_longctx cannot be deep-copied: copy it before patching, or patch the "
                        "copy with hf_longctx.patch(copy, hf_longctx.applied_sections(model))")

    def remove_wraps(self, applied: Applied) -> None:
        for wrap in applied.wraps:
            key = (id(wrap.owner), wrap.method)
            chain = self.chains[key]
            chain.remove(wrap.wrapper)
            if not chain.wrappers:
                chain.uninstall()
                del self.chains[key]


def call_arguments(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call ``fn(*args, **kwargs)`` by name (``**kwargs`` of ``fn`` flattened in), for
    wrappers that read or replace an argument however the caller passed it."""
    bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
            bound.update(bound.pop(name))
    return dict(bound)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a wrapper (``RecurrentMemoryModel``), or the model itself."""
    return getattr(model, "hf_longctx_base", model)


def applied_sections(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The sections recorded on ``model.config.hf_longctx`` (empty when unpatched)."""
    return dict(getattr(base_model(model).config, "hf_longctx", None) or {})


def config_before_patches(model: nn.Module) -> dict[str, Any] | None:
    """The config's attributes as they were before the first patch (None when unpatched)."""
    state: _PatchState | None = getattr(base_model(model), STATE_ATTR, None)
    return None if state is None else state.config_snapshot


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
    for name in sections:
        if name in recorded:
            raise SpecError(f"section '{name}' is already applied to this model; call hf_longctx.unpatch(model) first")
    _check_conflicts(recorded, sections)
    ordered = sorted(sections.items(), key=lambda item: _TECHNIQUES[item[0]].order)
    for name, section in ordered:
        if _TECHNIQUES[name].check is not None:
            _TECHNIQUES[name].check(target, section, spec)

    state: _PatchState | None = getattr(target, STATE_ATTR, None)
    if state is None:
        state = _PatchState(config_snapshot=copy.deepcopy(target.config.__dict__))
    config_before = copy.deepcopy(target.config.__dict__)
    object.__setattr__(target, STATE_ATTR, state)  # the chains live here while sections are applied
    done: list[tuple[str, Applied]] = []
    result = model
    try:
        for name, section in ordered:
            applied = _TECHNIQUES[name].apply(target, section, spec)
            done.append((name, applied))
            state.add_wraps(_TECHNIQUES[name].order, applied)
            if applied.model is not None:
                result = applied.model
    except BaseException:
        for _, applied in reversed(done):
            state.remove_wraps(applied)
            applied.undo()
        _restore_config(target.config, config_before)
        if not state.applied:
            object.__delattr__(target, STATE_ATTR)
        raise
    state.applied.extend(done)
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
        state.remove_wraps(applied)
        applied.undo()
    _restore_config(target.config, state.config_snapshot)
    object.__delattr__(target, STATE_ATTR)
    return target


def _restore_config(config, snapshot: dict[str, Any]) -> None:
    """Modules keep references to the config object itself and to its sub-configs (a multimodal model's
    language model reads ``config.text_config``), so restore their contents in place, recursively."""
    current = dict(config.__dict__)
    config.__dict__.clear()
    for key, value in snapshot.items():
        now = current.get(key)
        if isinstance(value, PreTrainedConfig) and type(now) is type(value) and now is not config:
            _restore_config(now, value.__dict__)
            config.__dict__[key] = now
        else:
            config.__dict__[key] = copy.deepcopy(value)


def _check_conflicts(recorded: dict[str, Any], sections: dict[str, SectionSpec]) -> None:
    """Sections that exclude each other, within the spec and against what is already applied."""
    for name in sections:
        for other in recorded:
            reason = SECTION_CLASSES[name].conflicts.get(other) or SECTION_CLASSES[other].conflicts.get(name)
            if reason:
                first, second = sorted((name, other), key=lambda s: _TECHNIQUES[s].order)
                raise SpecError(f"'{first}' and '{second}' cannot be combined: {reason}")
