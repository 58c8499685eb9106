"""Base class for spec sections: dict <-> dataclass with type checks and clear errors.

Every section of a :class:`~hf_longctx.spec.PatchSpec` is a dataclass deriving from
:class:`SectionSpec`. ``from_dict`` rejects unknown keys and values of the wrong type with
a :class:`SpecError` that names the key, the value and what is allowed; ``__post_init__`` of
each section checks value ranges.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, Union, get_args, get_origin


class SpecError(ValueError):
    """A patch spec is invalid, or cannot be applied to this model. Raised before anything is touched."""


# section name -> its dataclass, in registration order; filled by hf_longctx.patching.register_technique
SECTION_CLASSES: dict[str, type["SectionSpec"]] = {}


def spec_field(default: Any = None, help: str = "", **kwargs):
    """A dataclass field with a ``help`` text (peft style); lists/dicts get a default factory."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, inner) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


class SectionSpec:
    """Mixin for the dataclass of one spec section (``rope``, ``attention``, ...)."""

    section: ClassVar[str] = ""
    # other section -> why the two cannot be applied to one model (checked in both directions)
    conflicts: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_dict(cls, data: Any) -> "SectionSpec":
        if isinstance(data, cls):
            return data
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise SpecError(
                f"spec section '{cls.section}' must be a mapping of keys to values, got {type(data).__name__} {data!r}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if key not in fields:
                allowed = ", ".join(sorted(fields)) or "(no keys)"
                raise SpecError(f"unknown key '{cls.section}.{key}'; allowed keys: {allowed}")
            if not _matches(value, hints[key]):
                raise SpecError(
                    f"'{cls.section}.{key}' must be {_type_name(hints[key])}, got {type(value).__name__} {value!r}"
                )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The section as plain data, keeping only keys that differ from their defaults."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def _require(self, ok: bool, key: str, allowed: str) -> None:
        """Raise a SpecError naming ``section.key``, its value and what is allowed, unless ``ok``."""
        if not ok:
            raise SpecError(f"'{self.section}.{key}' = {getattr(self, key)!r} is invalid: {allowed}")
