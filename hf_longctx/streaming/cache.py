"""SinkCache: the attention-sink KV cache of StreamingLLM on the transformers v5 Cache API.

The cache keeps, per layer, the first ``num_sink_tokens`` tokens (the sinks) and the most
recent tokens: a step of ``c`` new tokens attends to the sinks plus at most
``window_length`` recent tokens, its own included (``window_length - c`` cached ones before
it), so at most ``S + W`` keys. Eviction happens lazily at the start of an update, once the
number of new tokens is known, so between steps the cache holds at most ``S + W`` tokens.

Positions follow StreamingLLM: the attended keys sit in consecutive slots, sinks first,
ending right before the new tokens. transformers rotates keys before caching them, so the
cache knows the position each cached key is rotated at and rotates it again by the
difference when its slot changes, using the inverse frequencies of the model's own rotary
embedding, looked up once per forward (the rope patch may have replaced it). The rotation is
exact for every rope type whose angle is ``position * inv_freq`` (default, linear, YaRN,
Llama 3, NTK; partial rotary of GPT-NeoX and Phi-3 rotates only the rotary dims), and when
the inverse frequencies themselves change (dynamic NTK, LongRoPE switching to its long
factors) the cached keys are moved onto the new frequencies too.

Numerics: in the ``"cache"`` frame every window key is shifted by one slot per step, in place,
at most ``W - 1`` times before it is evicted, so the rounding does not grow with the stream;
after those shifts a key is as close to the exact rotation at its slot as float32 RoPE computed
from scratch (:func:`shift_factors`). In the ``"absolute"`` frame the sinks are shifted on every
step for as long as the stream lasts; their rounding grows like that of float32 RoPE at the
growing absolute positions the model itself uses there.

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
from typing import Literal

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionLayer

from ..families import get_family
from .rotation import ROTATE_HALF, RotaryLayout, rotate_keys, shift_factors, shift_keys_


class SinkCacheLayer(CacheLayerMixin):
    """One layer of a :class:`SinkCache`.

    Storage: ``key_buffer``/``value_buffer`` ``[B, H, capacity, D]`` hold the live slots
    ``start .. start + length``, exposed as the views ``keys``/``values`` ``[B, H, length, D]``
    (what the model passes to ``Cache.update``). ``layout`` says where the rotated part of the keys
    is (:class:`RotaryLayout`; None: the layer applies no rotation, nothing is ever re-rotated). The
    key in live slot ``i`` is rotated at position ``offset + i`` (every row) with the frequencies
    ``inv_freq``. ``pads``: ``[B]`` leading pad slots per row; ``seen``: tokens added so far.

    A step's cost does not grow with the stream: eviction drops the oldest window tokens by
    advancing ``start`` (the ``S`` sinks are copied up behind them), new tokens are written into
    the spare slots after the live ones (a fresh buffer every ``capacity - S - W`` evictions), and
    kept keys whose slot changes are rotated in place by one precomputed rotation per segment
    (sinks, window). Left padding (until its pads are evicted) and a change of the rotary
    frequencies take the general path: gather per row, rotate each key from its own position.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        num_sink_tokens: int,
        window_length: int,
        left_padding: torch.Tensor | None = None,
        layout: RotaryLayout | None = ROTATE_HALF,
    ):
        super().__init__()
        self.num_sink_tokens = num_sink_tokens
        self.window_length = window_length
        self.left_padding = left_padding
        self.layout = layout
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.start = self.length = self.offset = self.seen = 0
        self.pads: torch.Tensor | None = None
        self.has_pads = False  # pads.any(), kept on the host so that the usual step never synchronises
        self.inv_freq: torch.Tensor | None = None  # values of the frequencies the cached keys are rotated with
        self._inv_freq_seen: tuple[torch.Tensor, int] | None = None  # (tensor, version) last compared with them
        self._shifts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # delta -> shift_factors(inv_freq, delta)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]
        self.device = key_states.device
        self.key_buffer = key_states.new_empty((batch, heads, 0, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((batch, value_states.shape[1], 0, value_states.shape[-1]))
        pads = self.left_padding if self.left_padding is not None else torch.zeros(batch, dtype=torch.long)
        self.pads = pads.to(self.device, torch.long)
        self.has_pads = bool(self.pads.any())
        self._set_views()
        self.is_initialized = True

    def kept_length(self, num_new_tokens: int) -> int:
        """Cached tokens that stay visible to a step of ``num_new_tokens`` tokens (sinks never leave)."""
        return min(self.length, self.num_sink_tokens + max(self.window_length - num_new_tokens, 0))

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        inv_freq: torch.Tensor | None = None,
        start_position: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evict, re-rotate the kept keys to their StreamingLLM positions, append; return all keys/values.

        key_states/value_states: ``[B, H, c, D]`` the new tokens (keys rotated at their positions).
        ``inv_freq``: ``[R/2]`` the model's current rotary frequencies (None: no rotary embedding).
        ``start_position``: the position of the first new token (None: ``seen``); the kept keys are moved to
        the positions right before it.
        Returns views ``[B, H, kept + c, D]`` of the cache, valid until the next update.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (
            key_states.requires_grad or value_states.requires_grad or self.key_buffer.requires_grad
        ):
            # earlier steps' attention may have saved the views for backward: change copies, not them
            self.key_buffer, self.value_buffer = self.key_buffer.clone(), self.value_buffer.clone()
        num_new = key_states.shape[-2]
        keep = self.kept_length(num_new)
        target_offset = (self.seen if start_position is None else start_position) - keep
        frequencies_changed = self._frequencies_changed(inv_freq)
        if frequencies_changed or (self.has_pads and keep < self.length):
            old_positions = self._evict_rows(keep) + self.offset  # [B, keep]
            self._rotate_each_key(old_positions, target_offset, inv_freq)
        else:
            drop = self.length - keep
            sinks = min(self.num_sink_tokens, keep)
            self._evict_window(sinks, drop)
            self._shift(0, sinks, target_offset - self.offset, inv_freq)
            self._shift(sinks, keep, target_offset - self.offset - drop, inv_freq)
        if inv_freq is not None and (frequencies_changed or self.inv_freq is None):
            self.inv_freq = inv_freq.detach().clone()
            self._shifts.clear()
        self.offset = target_offset
        self._append(key_states, value_states)
        self.seen += num_new
        return self.keys, self.values

    def _frequencies_changed(self, inv_freq: torch.Tensor | None) -> bool:
        """Whether ``inv_freq`` differs from the frequencies the cached keys are rotated with (dynamic NTK,
        LongRoPE). Compares values only when the tensor or its version changed since the last call."""
        if inv_freq is None or self.inv_freq is None:
            return False
        seen = self._inv_freq_seen
        if seen is not None and seen[0] is inv_freq and seen[1] == inv_freq._version:
            return False
        self._inv_freq_seen = (inv_freq, inv_freq._version)
        return not torch.equal(self.inv_freq, inv_freq)

    def _shift(self, lo: int, hi: int, delta: int, inv_freq: torch.Tensor | None) -> None:
        """Move the keys in live slots ``lo..hi`` by ``delta`` positions (in place)."""
        if delta == 0 or hi <= lo or self.layout is None:
            return
        if inv_freq is None:
            raise _unbound_error()
        factors = self._shifts.get(delta)
        if factors is None:
            factors = self._shifts[delta] = shift_factors(inv_freq, delta)
        buffer = self.key_buffer if self.layout.tensor == "keys" else self.value_buffer
        shift_keys_(buffer[:, :, self.start + lo : self.start + hi], *factors, layout=self.layout)

    def _rotate_each_key(self, old_positions: torch.Tensor, target_offset: int, inv_freq: torch.Tensor | None) -> None:
        """Rotate every live key from ``old_positions`` ``[B, n]`` (with the frequencies ``self.inv_freq``) to
        ``target_offset + slot`` (with ``inv_freq``)."""
        if self.layout is None:
            return
        target = torch.arange(target_offset, target_offset + self.length, device=self.device)
        if inv_freq is None:
            if bool((old_positions != target).any()):
                raise _unbound_error()
            return
        old_freq = self.inv_freq if self.inv_freq is not None else inv_freq
        angles = target[:, None].double() * inv_freq.double() - old_positions[..., None].double() * old_freq.double()
        rotated = self.keys if self.layout.tensor == "keys" else self.values
        rotated.copy_(rotate_keys(rotated, angles, self.layout))

    def _evict_window(self, sinks: int, drop: int) -> None:
        """Drop the ``drop`` oldest tokens after the sinks: the sinks move up behind the window."""
        if drop <= 0:
            return
        for buffer in (self.key_buffer, self.value_buffer):
            source = buffer[:, :, self.start : self.start + sinks]
            buffer[:, :, self.start + drop : self.start + drop + sinks] = source.clone() if drop < sinks else source
        self.start += drop
        self.length -= drop
        self._set_views()

    def _evict_rows(self, keep: int) -> torch.Tensor:
        """Keep ``keep`` slots per row: drop leading pads first, then the oldest tokens after the sinks.

        Returns the kept slots' former indices ``[B, keep]``; the buffers are rebuilt compactly."""
        cached = self.length
        index = torch.arange(cached, device=self.device)
        drop = cached - keep
        drop_pads = self.pads.clamp(max=max(drop, 0))[:, None]
        window_start = (self.pads + self.num_sink_tokens)[:, None]
        dropped = (index < drop_pads) | ((index >= window_start) & (index < window_start + drop - drop_pads))
        kept = index.expand(len(self.pads), cached)[~dropped].view(-1, keep)  # [B, keep]
        gather = kept[:, None, :, None]
        keys = self.keys.gather(2, gather.expand(-1, self.keys.shape[1], -1, self.keys.shape[-1]))
        values = self.values.gather(2, gather.expand(-1, self.values.shape[1], -1, self.values.shape[-1]))
        self.pads = self.pads - drop_pads[:, 0]
        self.has_pads = bool(self.pads.any())
        self.key_buffer, self.value_buffer, self.start, self.length = keys, values, 0, keep
        self._set_views()
        return kept

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        num_new = key_states.shape[-2]
        if self.start + self.length + num_new > self.key_buffer.shape[-2]:
            self._reallocate(self.length + num_new)
        end = self.start + self.length
        self.key_buffer[:, :, end : end + num_new] = key_states
        self.value_buffer[:, :, end : end + num_new] = value_states
        self.length += num_new
        self._set_views()

    def _reallocate(self, needed: int) -> None:
        """Fresh buffers for ``needed`` live slots plus spare ones (``max(S + W, needed) + margin``), live
        slots copied to the front. The spare slots let eviction advance ``start`` for many steps."""
        size = max(self.num_sink_tokens + self.window_length, needed)
        capacity = size + max(16, size // 16)
        buffers = []
        for live in (self.keys, self.values):
            buffer = live.new_empty((*live.shape[:2], capacity, live.shape[-1]))
            buffer[:, :, : self.length] = live
            buffers.append(buffer)
        self.key_buffer, self.value_buffer = buffers
        self.start = 0
        self._set_views()

    def _set_views(self) -> None:
        self.keys = self.key_buffer[:, :, self.start : self.start + self.length]
        self.values = self.value_buffer[:, :, self.start : self.start + self.length]

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
        self.keys = self.values = self.key_buffer = self.value_buffer = self.pads = self.inv_freq = None
        self._inv_freq_seen = None
        self._shifts.clear()
        self.is_initialized = self.has_pads = False
        self.start = self.length = self.offset = self.seen = 0

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.device)
            self.key_buffer, self.value_buffer = self.key_buffer[index], self.value_buffer[index]
            self.pads = self.pads[index]  # has_pads stays: selecting rows adds no pads
            self._set_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))


class SinkLinearAttentionLayer(SinkCacheLayer, LinearAttentionLayer):
    """A layer that holds attention keys and a recurrent state side by side (Falcon-H1: a Mamba-2 mixer beside
    the attention of every layer; transformers' ``LinearAttentionAnd*AttentionLayer``): the keys as a
    :class:`SinkCacheLayer`, the convolution and recurrent states as transformers' own ``LinearAttentionLayer``
    (fixed size; every token of the stream enters them)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, number_of_states: int, num_sink_tokens: int, window_length: int,
                 left_padding: torch.Tensor | None = None, layout: RotaryLayout | None = ROTATE_HALF):
        SinkCacheLayer.__init__(self, num_sink_tokens, window_length, left_padding, layout)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        # Cache.update passes (keys, values); the state updates pass conv_states / recurrent_states by keyword
        if len(args) == 2 and not kwargs:
            SinkCacheLayer.lazy_initialization(self, *args)
            self.dtype = args[0].dtype
        else:
            LinearAttentionLayer.lazy_initialization(self, *args, **kwargs)

    def reset(self) -> None:
        SinkCacheLayer.reset(self)
        LinearAttentionLayer.reset(self)

    def _select_rows(self, index: torch.Tensor) -> None:
        SinkCacheLayer._select_rows(self, index)
        LinearAttentionLayer.reorder_cache(self, index)  # index_select on every state's batch rows

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = next((t.shape[0] for t in (self.key_buffer, *self.conv_states.values(), *self.recurrent_states.values())
                     if isinstance(t, torch.Tensor)), None)
        if rows is not None:
            self._select_rows(torch.arange(rows).repeat_interleave(repeats))


def _unbound_error() -> ValueError:
    return ValueError(
        "SinkCache has to re-rotate cached keys but does not know the rotary embedding: "
        "pass SinkCache(..., model=model) or patch the model with {'streaming': {...}}"
    )


class SinkCache(Cache):
    """Attention-sink KV cache (StreamingLLM): the first ``num_sink_tokens`` tokens plus a sliding window.

    Args:
        num_sink_tokens: S, the initial tokens kept forever (>= 0).
        window_length: W, the recent tokens a step attends to, its own tokens included, sinks
            excluded (>= 1). At most ``S + W`` tokens are cached.
        model: the model whose rotary embedding re-rotates the kept keys. Not needed once the
            model is patched for streaming (the patch binds it).

    Bound to a model, the cache has the layers of the model's own default cache with each attention
    layer replaced by a :class:`SinkCacheLayer`: the recurrent states of linear-attention, SSM and
    convolution layers of hybrid models stay transformers' own (fixed size, every token of the stream
    enters them), and each attention layer re-rotates the part of its cache that holds rotated keys
    (the rotated ``k_pe`` of multi-head latent attention; see :mod:`hf_longctx.streaming.structure`).
    Unbound, every layer is a :class:`SinkCacheLayer`.

    Use it as ``model.generate(ids, past_key_values=SinkCache(4, 1020, model=model))`` (or
    ``cache=``) or in a loop of ``model(ids, cache=cache)``. See the module docstring for the
    position frames and left padding.
    """

    def __init__(self, num_sink_tokens: int = 4, window_length: int = 1020, model: nn.Module | None = None):
        if not isinstance(num_sink_tokens, int) or num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens must be an int >= 0, got {num_sink_tokens!r}")
        if not isinstance(window_length, int) or window_length < 1:
            raise ValueError(f"window_length must be an int >= 1, got {window_length!r}")
        super().__init__(layer_class_to_replicate=self._new_layer)
        self.num_sink_tokens = num_sink_tokens
        self.window_length = window_length
        self.position_frame: Literal["absolute", "cache"] = "absolute"
        self._model_ref = None
        self._left_padding: torch.Tensor | None = None
        self._native_windows: list[int | None] = []  # per layer of the bound model (None: full attention)
        self._layer_types: list[str | None] = []
        self._layouts: dict[int, RotaryLayout | None] = {}  # per attention layer of the bound model
        self._first_attention = 0  # index of the first sink layer: each forward's first update
        self._step_inv_freq: dict[str | None, torch.Tensor | None] = {}
        self._step_start = 0
        if model is not None:
            self.bind(model)

    def bind(self, model: nn.Module, position_frame: Literal["absolute", "cache"] | None = None) -> "SinkCache":
        """Use ``model``'s rotary embedding (looked up on each update), its layers' native windows and the
        structure of its own cache; optionally set the position frame.

        Raises ValueError when the model's cache has layers a sink cache can neither replace nor keep, or
        cached keys it cannot move exactly (the streaming patch refuses such models up front)."""
        if self._model_ref is None or self._model_ref() is not model:
            from .structure import rotary_layouts, unsupported_layers

            get_family(model)
            unsupported = unsupported_layers(model)
            if unsupported:
                raise ValueError("a sink cache cannot stand in for " + "; ".join(unsupported))
            self._model_ref = weakref.ref(model)
            config = model.config.get_text_config(decoder=True)
            layer_types = getattr(config, "layer_types", None)
            window = getattr(config, "sliding_window", None)
            self._layer_types = list(layer_types or [None] * config.num_hidden_layers)
            # a chunked layer (Llama 4) sees at most its chunk: a window cache of that size, under its own mask
            native = {None: window, "sliding_attention": window,
                      "chunked_attention": getattr(config, "attention_chunk_size", None)}
            self._native_windows = [native.get(kind) for kind in self._layer_types]
            self._layouts = rotary_layouts(model, self._inv_freq())
            if self.get_seq_length() == 0:
                self._build_layers()
        if position_frame is not None:
            self.position_frame = position_frame
        return self

    def _build_layers(self) -> None:
        """The bound model's default cache layers, each attention layer replaced by a sink layer."""
        from .structure import default_layers, is_attention_layer

        model = self._model_ref()
        self.layers = [self._new_layer(index, layer) if is_attention_layer(layer) else layer
                       for index, layer in enumerate(default_layers(model))]
        self._first_attention = next((i for i, layer in enumerate(self.layers) if isinstance(layer, SinkCacheLayer)), 0)

    def _new_layer(self, index: int | None = None, default=None) -> SinkCacheLayer:
        """Layer ``index`` (default: the next one): sinks + window, or the layer's own native window where that
        is no wider (hybrid models' local layers keep exactly their native attention). ``default``: the model's
        own cache layer it stands in for; one that also holds a recurrent state keeps it beside the keys."""
        index = len(self.layers) if index is None else index
        native = self._native_windows[index] if index < len(self._native_windows) else None
        native = getattr(default, "sliding_window", None) or native
        layout = self._layouts.get(index) if self._model_ref is not None else ROTATE_HALF  # bound: as probed
        sinks, window = ((0, native) if native is not None and native <= self.num_sink_tokens + self.window_length
                         else (self.num_sink_tokens, self.window_length))
        if isinstance(default, LinearAttentionLayer):
            layer = SinkLinearAttentionLayer(default.number_of_states, sinks, window, self._left_padding, layout)
        else:
            layer = SinkCacheLayer(sinks, window, self._left_padding, layout)
        layer.is_sliding = native is not None  # transformers builds each mask type from a layer of that type
        return layer

    def set_left_padding(self, pad_counts: torch.Tensor) -> None:
        """Leading pad tokens per row (``[B]``) of the first input; call before the first update."""
        if self.get_seq_length() > 0:
            raise ValueError("set_left_padding must be called before the first update of the cache")
        self._left_padding = pad_counts.detach().to(torch.long)
        if self._model_ref is not None and self._model_ref() is not None:
            self._build_layers()
        else:
            self.layers, self._first_attention = [], 0

    def _sink_layers(self) -> list[SinkCacheLayer]:
        return [layer for layer in self.layers if isinstance(layer, SinkCacheLayer)]

    def kept_length(self, num_new_tokens: int) -> int:
        """Cached tokens that a step of ``num_new_tokens`` tokens attends to in the layers that keep the most
        (position of its first token in the ``"cache"`` frame)."""
        return max((layer.kept_length(num_new_tokens) for layer in self._sink_layers()), default=0)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens seen so far by the attention layers (what ``generate`` and default ``position_ids`` expect),
        not the cached count; recurrent layers of hybrid models count no tokens of their own here."""
        layers = self.layers
        if layer_idx is not None and layer_idx < len(layers) and isinstance(layers[layer_idx], SinkCacheLayer):
            return layers[layer_idx].seen
        return next((layer.seen for layer in self._sink_layers()), 0)

    def _inv_freq(self) -> dict[str | None, torch.Tensor | None]:
        """Layer type -> the rotary frequencies of the layers of that type (one rotary per type, as in
        Gemma 3, or one for all)."""
        model = self._model_ref() if self._model_ref is not None else None
        rotary = None if model is None else get_family(model).rotary_embedding(model)
        if rotary is None:
            return {}
        return {kind: getattr(rotary, f"{kind}_inv_freq") if hasattr(rotary, f"{kind}_inv_freq") else rotary.inv_freq
                for kind in set(self._layer_types) or {None}}

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == self._first_attention:  # once per forward, before any layer moved: the rotary embedding ran
            self._step_inv_freq = self._inv_freq()
            num_new = key_states.shape[-2]
            self._step_start = self.kept_length(num_new) if self.position_frame == "cache" else self.get_seq_length()
        kind = self._layer_types[layer_idx] if layer_idx < len(self._layer_types) else None
        # Cache.update creates the layers on first use; the caller's cache kwargs are not needed here.
        return super().update(
            key_states,
            value_states,
            layer_idx,
            inv_freq=self._step_inv_freq.get(kind),
            start_position=self._step_start,
        )

    def cached_lengths(self) -> list[int]:
        """Number of key slots currently held by each attention layer (recurrent layers hold none)."""
        return [layer.length for layer in self._sink_layers()]
