"""hf_longctx: retrofit Hugging Face Transformers models for long context.

Public API (see README.md): ``patch``, ``unpatch``, ``load_spec``, ``list_presets``,
``save_pretrained``, ``from_pretrained``, ``push_to_hub``, ``SinkCache``,
``flash_attention``, ``RecurrentMemoryModel``, ``upcycle_moe``.
"""

from . import attention, memory, moe, positions, streaming  # noqa: F401  (each registers its technique)
from ._lazy import lazy_getattr as _lazy_getattr
from .config_base import SpecError
from .families import FAMILIES, supported_model_types
from .hub import from_pretrained, model_card, push_to_hub, save_pretrained
from .patching import applied_sections, patch, unpatch
from .spec import PatchSpec, list_presets, load_spec

__version__ = "0.1.0"

# Heavier entry points, imported on first use (the Triton kernels import triton).
_LAZY = {
    "flash_attention": "hf_longctx.kernels",
    "SinkCache": "hf_longctx.streaming",
    "RecurrentMemoryModel": "hf_longctx.memory",
    "upcycle_moe": "hf_longctx.moe",
}

__getattr__ = _lazy_getattr(__name__, _LAZY, submodules=("evaluation", "training", "kernels"))


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
