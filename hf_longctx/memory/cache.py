"""RecurrentMemoryCache: the state :class:`~hf_longctx.memory.RecurrentMemoryModel` carries between generation steps.

transformers' ``generate`` hands the cache from one forward call to the next, reorders it with the
beams and returns it with ``return_dict_in_generate``; this cache holds everything the recurrence
needs to go on from where the last call stopped:

- ``memory`` ``[B, M, H]``: the read memory of the open segment,
- ``segment``: the base model's own cache (a ``DynamicCache``) of the open segment: its read memory and
  the ``filled`` tokens it holds so far; None until the segment's first token arrives,
- ``seen``: the tokens consumed in all, segments before the open one included,
- ``rows``: once a call brings padding, one such state per row (see :meth:`RecurrentMemoryCache.split_rows`):
  each row is segmented by its own real tokens, so its segments close at its own steps.

When the open segment reaches ``segment_length`` tokens its write slots run on ``segment``, their
hidden states become ``memory`` and the next segment starts from an empty base cache.
"""

from __future__ import annotations

import copy

import torch
from transformers import Cache

from .. import compat

# The keyword under which transformers passes a cache to ``forward`` and returns it in the model
# output: ``cache`` since transformers 5.24 (``past_key_values`` before, a deprecated alias until 5.40).
CACHE_KWARG = compat.CACHE  # the cache keyword of the installed transformers (see hf_longctx.compat)


class RecurrentMemoryCache(Cache):
    """Recurrent memory and the open segment's KV cache, for ``RecurrentMemoryModel.generate``.

    ``generate`` creates one on its own (also when it offers an empty cache of another class); pass
    ``cache=RecurrentMemoryCache()`` to keep it, e.g. to go on generating from a returned one.
    ``get_seq_length()`` counts every token consumed, padding included, so that ``generate`` feeds only
    the new ones. The state cannot be cropped: once a segment is closed, its tokens live only in the
    memory; assisted decoding, which needs to roll back, is refused by ``generate``.
    """

    def __init__(self):
        super().__init__(layers=[])
        self.memory: torch.Tensor | None = None  # [B, M, H]
        self.segment: Cache | None = None
        self.filled = 0
        self.seen = 0
        self.rows: list[RecurrentMemoryCache] | None = None  # one state per row, once padding came

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seen={self.seen}, filled={self.filled})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed in all (padding included); the memory positions do not count."""
        return self.seen

    def reset(self) -> None:
        self.__init__()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i of the state becomes row ``beam_idx[i]``, memory included."""
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.memory is not None:
            self._select(torch.arange(self.memory.shape[0], device=self.memory.device).repeat_interleave(repeats))

    def split_rows(self, batch: int) -> list["RecurrentMemoryCache"]:
        """One state per row, each continuing that row's own segments (``batch`` rows). A batched state
        holds no padding (padded calls go row by row), so it splits into the rows' states exactly, once."""
        if self.rows is None:
            self.rows = []
            for b in range(batch):
                row = RecurrentMemoryCache()
                row.memory = None if self.memory is None else self.memory[b : b + 1]
                if self.segment is not None:
                    row.segment = copy.deepcopy(self.segment)
                    row.segment.reorder_cache(torch.tensor([b], device=self.memory.device))
                row.filled, row.seen = self.filled, self.seen
                self.rows.append(row)
            self.segment, self.filled = None, 0
        return self.rows

    def _select(self, rows: torch.Tensor) -> None:
        if self.rows is not None:  # a row selected twice (beams) gets its own copy: the rows change in place
            self.rows = [copy.deepcopy(self.rows[i]) for i in rows.tolist()]
        if self.memory is not None:
            self.memory = self.memory.index_select(0, rows.to(self.memory.device))
        if self.segment is not None:
            self.segment.reorder_cache(rows)  # a row selection, which every cache layer implements

    def crop(self, tokens_to_remove: int) -> None:
        """Only the no-op ``crop(0)``: the tokens of closed segments live on only in the memory."""
        if tokens_to_remove:
            raise NotImplementedError(
                f"{type(self).__name__} cannot remove {abs(tokens_to_remove)} tokens: the tokens of closed segments "
                "live on only in the memory"
            )

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        # Not a pure linear-attention state: generate may slice its input by get_seq_length().
        return [False]
