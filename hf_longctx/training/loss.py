"""The chunked causal-LM loss for training: the ``loss`` patch section (see :mod:`hf_longctx.loss`).

:func:`use_chunked_loss` is ``patch(model, {"loss": {"chunk_size": n}})``, kept for scripts
that call it by this name.
"""

from __future__ import annotations

from torch import nn

from ..loss import IGNORE_INDEX, causal_lm_loss, chunked_cross_entropy
from ..patching import patch

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "chunked_cross_entropy", "use_chunked_loss"]


def use_chunked_loss(model: nn.Module, chunk_size: int = 4096) -> nn.Module:
    """Make ``model`` compute its training loss in chunks of ``chunk_size`` tokens; returns the model.

    The same as ``hf_longctx.patch(model, {"loss": {"chunk_size": chunk_size}})``: undone by
    ``hf_longctx.unpatch`` with the other sections.
    """
    return patch(model, {"loss": {"chunk_size": chunk_size}})
