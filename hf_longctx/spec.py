"""PatchSpec: what to patch, from a dict, a preset name, a YAML file or another PatchSpec.

A spec holds one optional section per technique (``rope``, ``attention``, ``loss``, ...).
The sections and their dataclasses are not listed here: every technique registers its
section with the patching core (``register_technique``), and a spec accepts exactly the
registered ones. Each section is validated when it is built, so a bad spec fails before
any module is touched. Presets are the YAML files of ``patches/``, shipped inside the wheel
as ``hf_longctx.presets``.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Union

import yaml

from .config_base import SECTION_CLASSES, SectionSpec, SpecError


class PatchSpec:
    """A full patch: a section per technique, each optional (absent means "leave this aspect alone").

    Build it with :func:`load_spec`, :meth:`from_dict` or keyword arguments
    (``PatchSpec(rope=RopeSpec(type="yarn", factor=4.0))``; dicts are accepted for sections).
    ``spec.rope`` is the section's dataclass, or None when the spec does not set it.
    """

    def __init__(self, **sections: SectionSpec | dict | None):
        unknown = sorted(set(sections) - set(SECTION_CLASSES))
        if unknown:
            raise SpecError(f"unknown spec section '{unknown[0]}'; allowed sections: {', '.join(SECTION_CLASSES)}")
        self._sections = {
            name: SECTION_CLASSES[name].from_dict(sections[name])
            for name in SECTION_CLASSES
            if sections.get(name) is not None
        }
        for name in self._sections:
            for other, reason in SECTION_CLASSES[name].conflicts.items():
                if other in self._sections:
                    raise SpecError(f"'{name}' and '{other}' cannot be combined: {reason}")

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in SECTION_CLASSES:
            raise AttributeError(f"PatchSpec has no section '{name}'; sections: {', '.join(SECTION_CLASSES)}")
        return self._sections.get(name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatchSpec) and self._sections == other._sections

    def __repr__(self) -> str:
        return f"PatchSpec({', '.join(f'{k}={v!r}' for k, v in self._sections.items())})"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PatchSpec":
        if not isinstance(data, dict):
            raise SpecError(f"a spec must be a mapping of sections, got {type(data).__name__} {data!r}")
        return cls(**{name: {} if value is None else value for name, value in data.items()})

    def sections(self) -> dict[str, SectionSpec]:
        """The sections that are set, in registration order."""
        return dict(self._sections)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: section.to_dict() for name, section in self._sections.items()}


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
        raise SpecError("the spec is empty: give at least one section (" + ", ".join(SECTION_CLASSES) + ")")
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
