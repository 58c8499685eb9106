"""Attention patch (``attention``): sliding window, sinks and learnable sink logits as a transformers backend.

Importing this package registers the technique. ``flash_attention`` (the kernels) is
re-exported lazily: it imports triton.
"""

import importlib

from .backend import SINK_INIT, attention_implementation  # importing backend registers the technique
from .config import AttentionSpec
from .functions import window_sink_mask

__all__ = ["SINK_INIT", "AttentionSpec", "attention_implementation", "flash_attention", "window_sink_mask"]


def __getattr__(name):
    if name == "flash_attention":
        return importlib.import_module("hf_longctx.kernels").flash_attention
    raise AttributeError(f"module 'hf_longctx.attention' has no attribute '{name}'")
