"""Module attributes imported on first use (a PEP 562 module ``__getattr__``)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, attributes: dict[str, str], submodules: tuple[str, ...] = ()) -> Callable[[str], Any]:
    """A ``__getattr__`` for module ``package``: ``attributes`` maps a name to the module that defines
    it, imported when the name is first read; ``submodules`` of ``package`` are returned as modules."""

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name in attributes:
            return getattr(importlib.import_module(attributes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
