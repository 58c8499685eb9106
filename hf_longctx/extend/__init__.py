"""Training-free context extension (``extend``): Self-Extend and Dual Chunk Attention by position remapping.

Importing this package registers the technique.
"""

from .attention import remapped_attention, rotate
from .config import ExtendSpec
from .patch import dual_chunk_config, extend_implementation, section_from_dual_chunk_config  # registers the technique
from .rules import Pass, passes

__all__ = ["ExtendSpec", "Pass", "dual_chunk_config", "extend_implementation", "passes", "remapped_attention",
           "rotate", "section_from_dual_chunk_config"]
