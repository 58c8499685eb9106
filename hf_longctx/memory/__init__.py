"""Recurrent memory (``memory``): the RMT wrapper ``RecurrentMemoryModel``."""

from . import model  # noqa: F401  (registers the technique)
from .config import MemorySpec
from .model import RecurrentMemoryModel, RecurrentMemoryOutput

__all__ = ["MemorySpec", "RecurrentMemoryModel", "RecurrentMemoryOutput"]
