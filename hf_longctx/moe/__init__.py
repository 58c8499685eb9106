"""Mixture-of-Experts upcycling (``moe``): dense MLPs into sparse MoE layers, native Mixtral/Qwen-MoE export."""

from . import upcycle  # noqa: F401  (registers the technique)
from .config import MoESpec
from .layer import SparseMoeBlock
from .upcycle import upcycle_moe

__all__ = ["MoESpec", "SparseMoeBlock", "upcycle_moe"]
