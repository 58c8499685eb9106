"""Position patches: RoPE scaling (``rope``) and ALiBi (``alibi``)."""

from . import alibi, rope  # noqa: F401  (registers the techniques)
from .alibi import alibi_slopes, module_alibi_slopes
from .config import AlibiSpec, RopeSpec

__all__ = ["AlibiSpec", "RopeSpec", "alibi_slopes", "module_alibi_slopes"]
