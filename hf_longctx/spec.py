"""PatchSpec: what to patch, from a dataclass, a dict, a preset name or a YAML file.

A spec has one optional section per technique (``rope``, ``alibi``, ``attention``,
``streaming``, ``memory``, ``moe``). Each section is validated when it is built, so a bad
spec fails before any module is touched. Presets are the YAML files of ``patches/``,
shipped inside the wheel as ``hf_longctx.presets``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from .attention.config import AttentionSpec
from .config_base import SectionSpec, SpecError
from .memory.config import MemorySpec
from .moe.config import MoESpec
from .positions.config import AlibiSpec, RopeSpec
from .streaming.config import StreamingSpec

SECTIONS: dict[str, type[SectionSpec]] = {
    cls.section: cls for cls in (RopeSpec, AlibiSpec, AttentionSpec, StreamingSpec, MemorySpec, MoESpec)
}


@dataclass
class PatchSpec:
    """A full patch: each section is optional; ``None`` means "leave this aspect alone"."""

    rope: RopeSpec | None = None
    alibi: AlibiSpec | None = None
    attention: AttentionSpec | None = None
    streaming: StreamingSpec | None = None
    memory: MemorySpec | None = None
    moe: MoESpec | None = None

    def __post_init__(self):
        if self.rope is not None and self.alibi is not None:
            raise SpecError("'rope' and 'alibi' cannot be combined: ALiBi replaces the rotary embedding")
        if self.memory is not None and self.streaming is not None:
            raise SpecError("'memory' and 'streaming' cannot be combined: both own the way long inputs are split")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PatchSpec":
        if not isinstance(data, dict):
            raise SpecError(f"a spec must be a mapping of sections, got {type(data).__name__} {data!r}")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise SpecError(f"unknown spec section '{unknown[0]}'; allowed sections: {', '.join(SECTIONS)}")
        return cls(**{name: SECTIONS[name].from_dict(value) for name, value in data.items()})

    def sections(self) -> dict[str, SectionSpec]:
        """The sections that are set, in application order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: section.to_dict() for name, section in self.sections().items()}


SpecLike = Union[PatchSpec, dict, str, Path, None]


def _preset_dir():
    return importlib.resources.files("hf_longctx.presets")


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description (the first comment line of its YAML file)."""
    presets = {}
    for entry in sorted(_preset_dir().iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            presets[entry.name[: -len(".yaml")]] = _description(entry.read_text(encoding="utf-8"))
    return presets


def _description(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def load_spec(spec: SpecLike = None, **overrides: Any) -> PatchSpec:
    """Build a validated :class:`PatchSpec`.

    ``spec`` is a PatchSpec, a dict of sections, a preset name (see :func:`list_presets`), or a
    path to a YAML file. ``overrides`` are sections given as keyword arguments
    (``load_spec("yarn-4x", attention={"sliding_window": 4096})``); each replaces the section
    of the same name.
    """
    if isinstance(spec, PatchSpec):
        data = spec.to_dict()
    elif isinstance(spec, dict):
        data = dict(spec)
    elif isinstance(spec, (str, Path)):
        data = _read_yaml(spec)
    elif spec is None:
        data = {}
    else:
        raise SpecError(f"a spec must be a PatchSpec, dict, preset name or YAML path, got {type(spec).__name__}")
    data.update(overrides)
    if not data:
        raise SpecError("the spec is empty: give at least one section (" + ", ".join(SECTIONS) + ")")
    return PatchSpec.from_dict(data)


def _read_yaml(name_or_path: str | Path) -> dict:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SpecError(f"spec file '{path}' does not exist")
        text = path.read_text(encoding="utf-8")
    else:
        preset = _preset_dir() / f"{name_or_path}.yaml"
        if not preset.is_file():
            raise SpecError(
                f"unknown preset '{name_or_path}'; available presets: {', '.join(list_presets())} "
                "(or give a path to a .yaml file)"
            )
        text = preset.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise SpecError(f"spec '{name_or_path}' must be a YAML mapping of sections, got {type(data).__name__}")
    return data
