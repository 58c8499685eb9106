"""Chunked loss (``loss``): the model's own causal-LM loss without the ``[N, vocab]`` logits.

Importing this package registers the technique.
"""

from . import patch  # noqa: F401  (registers the technique)
from .chunked import IGNORE_INDEX, HeadTransform, causal_lm_loss, chunked_cross_entropy
from .config import LossSpec
from .patch import head_transform

__all__ = ["IGNORE_INDEX", "HeadTransform", "LossSpec", "causal_lm_loss", "chunked_cross_entropy", "head_transform"]
