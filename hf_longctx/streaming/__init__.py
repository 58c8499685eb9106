"""Streaming (``streaming``): the attention-sink KV cache of StreamingLLM and the patch that makes
``generate`` use it. Importing this package registers the technique."""

from . import patch  # noqa: F401  (registers the technique)
from .cache import SinkCache, SinkCacheLayer, SinkLinearAttentionLayer
from .config import StreamingSpec
from .patch import default_prefill_chunk, streaming_forward

__all__ = ["SinkCache", "SinkCacheLayer", "SinkLinearAttentionLayer", "StreamingSpec", "default_prefill_chunk", "streaming_forward"]
