"""Attention kernels: Triton flash attention, its blocked CPU path and dense reference.

No transformers import here; the HF-facing glue lives in `hf_longctx.attention`.
"""

from .flash_attention import flash_attention
from .reference import flash_attention_reference

__all__ = ["flash_attention", "flash_attention_reference"]
