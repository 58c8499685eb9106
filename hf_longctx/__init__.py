"""hf_longctx: retrofit Hugging Face Transformers models for long context.

Public API (see README.md): ``patch``, ``unpatch``, ``load_spec``, ``list_presets``,
``save_pretrained``, ``from_pretrained``, ``push_to_hub``, ``SinkCache``,
``flash_attention``, ``RecurrentMemoryModel``, ``upcycle_moe``.
"""

import importlib

from . import attention, extend, loss, positions  # noqa: F401  (each registers its technique)
from .loss import tiling as _tiling  # noqa: F401  (registers the 'tiling' section)
from .config_base import SpecError
from .families import FAMILIES, supported_model_types
from .hub import from_pretrained, model_card, push_to_hub, save_pretrained
from .memory import RecurrentMemoryModel
from .moe import upcycle_moe
from .patching import applied_sections, patch, unpatch
from .spec import PatchSpec, list_presets, load_spec
from .streaming import SinkCache

__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use: the Triton kernels import triton; evaluation imports matplotlib.
    if name in ("evaluation", "training", "kernels"):
        return importlib.import_module(f"hf_longctx.{name}")
    if name == "flash_attention":
        return importlib.import_module("hf_longctx.kernels").flash_attention
    raise AttributeError(f"module 'hf_longctx' has no attribute '{name}'")


__all__ = [
    "FAMILIES",
    "PatchSpec",
    "RecurrentMemoryModel",
    "SinkCache",
    "SpecError",
    "applied_sections",
    "flash_attention",
    "from_pretrained",
    "list_presets",
    "load_spec",
    "model_card",
    "patch",
    "push_to_hub",
    "save_pretrained",
    "supported_model_types",
    "unpatch",
    "upcycle_moe",
]
