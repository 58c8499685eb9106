"""Recurrent memory (``memory``): the RMT wrapper ``RecurrentMemoryModel`` and its generation cache."""

from . import model  # noqa: F401  (registers the technique)
from .cache import RecurrentMemoryCache
from .config import MemorySpec
from .model import RecurrentMemoryModel, RecurrentMemoryOutput

__all__ = ["MemorySpec", "RecurrentMemoryCache", "RecurrentMemoryModel", "RecurrentMemoryOutput"]
