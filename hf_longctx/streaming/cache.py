"""SinkCache: the attention-sink KV cache of StreamingLLM on the transformers v5 Cache API.

The cache keeps, per layer, the first ``num_sink_tokens`` tokens (the sinks) and the most
recent tokens: a step of ``c`` new tokens attends to the sinks plus at most
``window_length`` recent tokens, its own included (``window_length - c`` cached ones before
it), so at most ``S + W`` keys. Eviction happens lazily at the start of an update, once the
number of new tokens is known, so between steps the cache holds at most ``S + W`` tokens.

Positions follow StreamingLLM: the attended keys sit in consecutive slots, sinks first,
ending right before the new tokens. transformers rotates keys before caching them, so each
cached key remembers the position it is rotated at (``positions``) and is rotated again by
the difference when its slot changes, using the inverse frequencies of the model's own
rotary embedding, looked up on every update (the rope patch may have replaced it). The
rotation is exact for every rope type whose angle is ``position * inv_freq`` (default,
linear, YaRN, Llama 3, NTK; partial rotary of GPT-NeoX and Phi-3 rotates only the rotary
dims), and when the inverse frequencies themselves change (dynamic NTK, LongRoPE switching
to its long factors) the cached keys are moved onto the new frequencies too.

Two position frames, chosen by who computes the ``position_ids``:

* ``"absolute"`` (default): new tokens sit at ``get_seq_length()`` = tokens seen so far,
  which is what ``generate`` and a plain ``model(ids, cache=cache)`` use. Window keys keep
  their rotation; the sinks are moved up to sit just before the window. All distances are
  StreamingLLM's, but the absolute angles grow with the stream.
* ``"cache"``: new tokens sit right after the kept keys (``kept_length``), so no position
  ever exceeds ``S + W - 1``. The streaming patch feeds the model these positions; this is
  what StreamingLLM does and what dynamic NTK and LongRoPE need.

Left padding: ``set_left_padding(counts)`` before the first update (the streaming patch does
it from the attention mask) makes every row keep its own first real tokens as sinks; pads
are evicted first. The 2D ``attention_mask`` given to the model must then cover every token
seen so far, as ``generate`` does.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Literal

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ..families import get_family


def rotate_keys(keys: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the rotary part of ``keys`` by ``angles`` (rotate-half convention of transformers).

    keys: ``[B, H, N, D]``; angles: ``[B, N, R/2]`` (radians) where ``R <= D`` is the rotary
    dimension; dims ``R..D`` pass through. Computed in float32, returned in ``keys.dtype``.
    """
    half = angles.shape[-1]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    x = keys.float()
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half :]], dim=-1)
    return rotated.to(keys.dtype)


class SinkCacheLayer(CacheLayerMixin):
    """One layer of a :class:`SinkCache`.

    ``keys``/``values``: ``[B, H, n, D]`` (rotated keys); ``positions``: ``[B, n]`` the position
    each cached key is rotated at; ``pads``: ``[B]`` leading pad slots per row; ``seen``: tokens
    added so far.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, num_sink_tokens: int, window_length: int, left_padding: torch.Tensor | None = None):
        super().__init__()
        self.num_sink_tokens = num_sink_tokens
        self.window_length = window_length
        self.left_padding = left_padding
        self.seen = 0
        self.positions: torch.Tensor | None = None
        self.pads: torch.Tensor | None = None
        self.inv_freq: torch.Tensor | None = None  # frequencies the cached keys are rotated with

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty((batch, heads, 0, key_states.shape[-1]))
        self.values = value_states.new_empty((batch, heads, 0, value_states.shape[-1]))
        self.positions = torch.zeros((batch, 0), dtype=torch.long, device=self.device)
        pads = self.left_padding if self.left_padding is not None else torch.zeros(batch, dtype=torch.long)
        self.pads = pads.to(self.device, torch.long)
        self.is_initialized = True

    def kept_length(self, num_new_tokens: int) -> int:
        """Cached tokens that stay visible to a step of ``num_new_tokens`` tokens (sinks never leave)."""
        cached = self.keys.shape[-2] if self.is_initialized else 0
        return min(cached, self.num_sink_tokens + max(self.window_length - num_new_tokens, 0))

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        inv_freq: torch.Tensor | None = None,
        cache_positions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evict, re-rotate the kept keys to their StreamingLLM positions, append; return all keys/values.

        ``inv_freq``: ``[R/2]`` the model's current rotary frequencies (None: no rotary embedding).
        ``cache_positions``: the new tokens sit at ``kept_length`` (else at ``seen``).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        num_new = key_states.shape[-2]
        self._evict(self.kept_length(num_new))
        kept = self.keys.shape[-2]
        first = kept if cache_positions else self.seen
        slots = torch.arange(first - kept, first + num_new, device=self.device)
        self._move_keys(slots[:kept], inv_freq)
        batch = key_states.shape[0]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, slots[kept:].expand(batch, num_new)], dim=-1)
        if inv_freq is not None:
            self.inv_freq = inv_freq.detach().clone()
        self.seen += num_new
        return self.keys, self.values

    def _move_keys(self, target: torch.Tensor, inv_freq: torch.Tensor | None) -> None:
        """Rotate cached keys from ``positions`` to ``target`` ([n]), onto the current ``inv_freq``."""
        if self.keys.shape[-2] == 0:
            return
        delta = target - self.positions  # [B, n]
        freq_changed = self.inv_freq is not None and inv_freq is not None and not torch.equal(self.inv_freq, inv_freq)
        if not freq_changed:
            moved = delta.ne(0).any(dim=0).nonzero().flatten()
            if moved.numel() == 0:
                return
            if inv_freq is None:
                raise ValueError(
                    "SinkCache has to re-rotate cached keys but does not know the rotary embedding: "
                    "pass SinkCache(..., model=model) or patch the model with {'streaming': {...}}"
                )
            angles = delta[:, moved, None].float() * inv_freq.float()
            # out of place: the previous step's attention may still hold the old tensor for autograd
            self.keys = self.keys.index_copy(2, moved, rotate_keys(self.keys[:, :, moved], angles))
        else:
            angles = target.float()[None, :, None] * inv_freq.float() - self.positions.float()[..., None] * self.inv_freq
            self.keys = rotate_keys(self.keys, angles)
        self.positions = target.expand_as(self.positions).clone()

    def _evict(self, keep: int) -> None:
        """Keep ``keep`` slots per row: drop leading pads first, then the oldest tokens after the sinks."""
        cached = self.keys.shape[-2]
        drop = cached - keep
        if drop <= 0:
            return
        index = torch.arange(cached, device=self.device)
        if not bool(self.pads.any()):
            kept = torch.cat([index[: self.num_sink_tokens], index[self.num_sink_tokens + drop :]])
            self.keys, self.values = self.keys[:, :, kept], self.values[:, :, kept]
            self.positions = self.positions[:, kept]
            return
        drop_pads = self.pads.clamp(max=drop)[:, None]
        window_start = (self.pads + self.num_sink_tokens)[:, None]
        dropped = (index < drop_pads) | ((index >= window_start) & (index < window_start + drop - drop_pads))
        kept = index.expand(len(self.pads), cached)[~dropped].view(-1, keep)  # [B, keep]
        gather = kept[:, None, :, None]
        self.keys = self.keys.gather(2, gather.expand(-1, self.keys.shape[1], -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, gather.expand(-1, self.values.shape[1], -1, self.values.shape[-1]))
        self.positions = self.positions.gather(1, kept)
        self.pads = self.pads - drop_pads[:, 0]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys attended, index of the first one among all tokens seen), for transformers' mask builders."""
        kept = self.kept_length(query_length)
        return kept + query_length, self.seen - kept

    def get_seq_length(self) -> int:
        """Tokens seen so far (what ``generate`` and default ``position_ids`` expect), not the cached count."""
        return self.seen

    def get_max_length(self) -> int:
        return self.num_sink_tokens + self.window_length

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.pads = self.inv_freq = None
        self.is_initialized = False
        self.seen = 0

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.device)
            self.keys, self.values = self.keys[index], self.values[index]
            self.positions, self.pads = self.positions[index], self.pads[index]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))


class SinkCache(Cache):
    """Attention-sink KV cache (StreamingLLM): the first ``num_sink_tokens`` tokens plus a sliding window.

    Args:
        num_sink_tokens: S, the initial tokens kept forever (>= 0).
        window_length: W, the recent tokens a step attends to, its own tokens included, sinks
            excluded (>= 1). At most ``S + W`` tokens are cached.
        model: the model whose rotary embedding re-rotates the kept keys. Not needed once the
            model is patched for streaming (the patch binds it).

    Use it as ``model.generate(ids, past_key_values=SinkCache(4, 1020, model=model))`` (or
    ``cache=``) or in a loop of ``model(ids, cache=cache)``. See the module docstring for the
    position frames and left padding.
    """

    def __init__(self, num_sink_tokens: int = 4, window_length: int = 1020, model: nn.Module | None = None):
        if not isinstance(num_sink_tokens, int) or num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens must be an int >= 0, got {num_sink_tokens!r}")
        if not isinstance(window_length, int) or window_length < 1:
            raise ValueError(f"window_length must be an int >= 1, got {window_length!r}")
        super().__init__(layer_class_to_replicate=partial(SinkCacheLayer, num_sink_tokens, window_length))
        self.num_sink_tokens = num_sink_tokens
        self.window_length = window_length
        self.position_frame: Literal["absolute", "cache"] = "absolute"
        self._model_ref = None
        if model is not None:
            self.bind(model)

    def bind(self, model: nn.Module, position_frame: Literal["absolute", "cache"] | None = None) -> "SinkCache":
        """Use ``model``'s rotary embedding (looked up on each update); optionally set the position frame."""
        get_family(model)
        self._model_ref = weakref.ref(model)
        if position_frame is not None:
            self.position_frame = position_frame
        return self

    def set_left_padding(self, pad_counts: torch.Tensor) -> None:
        """Leading pad tokens per row (``[B]``) of the first input; call before the first update."""
        if self.get_seq_length() > 0:
            raise ValueError("set_left_padding must be called before the first update of the cache")
        self.layer_class_to_replicate = partial(
            SinkCacheLayer, self.num_sink_tokens, self.window_length, pad_counts.detach().to(torch.long)
        )
        self.layers = []

    def kept_length(self, num_new_tokens: int) -> int:
        """Cached tokens that a step of ``num_new_tokens`` tokens attends to (position of its first token
        in the ``"cache"`` frame)."""
        return self.layers[0].kept_length(num_new_tokens) if self.layers else 0

    def _inv_freq(self) -> torch.Tensor | None:
        model = self._model_ref() if self._model_ref is not None else None
        if model is None:
            return None
        rotary = get_family(model).rotary_embedding(model)
        return None if rotary is None else rotary.inv_freq

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self.layer_class_to_replicate())
        return self.layers[layer_idx].update(
            key_states,
            value_states,
            inv_freq=self._inv_freq(),
            cache_positions=self.position_frame == "cache",
        )

    def cached_lengths(self) -> list[int]:
        """Number of key slots currently held by each layer."""
        return [layer.keys.shape[-2] if layer.is_initialized else 0 for layer in self.layers]

    def cache_bytes(self) -> int:
        """Bytes held by the cached keys and values of all layers."""
        return sum(
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in self.layers
            if layer.is_initialized
        )
