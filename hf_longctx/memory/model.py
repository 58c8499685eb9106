"""RecurrentMemoryModel: Recurrent Memory Transformer (Bulatov et al., 2022, 2023) around any causal LM.

The input is split into segments of ``segment_length`` real tokens. Each segment is run
through the unchanged transformers model as ``inputs_embeds``::

    [ read memory (M) | segment tokens (<= L) | write slots (M) ]

The read memory of the first segment is the learned ``memory`` parameter ``[M, H]``; the
write slots carry the same vectors as the read memory, and their final hidden states (after
the model's last norm, ``hidden_states[-1]``) become the read memory of the next segment.
Causal attention keeps the segment's logits independent of its write slots, so only the
tokens' logits are computed and returned, concatenated over segments: ``[B, N, V]`` for an
input of N tokens, exactly as the base model would return them for a short input.

Position policy under RoPE (``segment-local``): every segment restarts its positions, so the
read memory sits at positions ``0..M-1``, the segment's tokens at ``M..M+l-1`` and the write
slots right after them. The base model therefore never sees a position beyond
``segment_length + 2 * memory_tokens``, however long the input: no RoPE extrapolation, and the
cost per token does not grow with the input length.

Padding (``attention_mask`` 0) never enters a segment: each row of a padded batch is cut into
segments by its own real tokens and runs alone (one base-model call per row and segment; a batch
without padding runs as one), so a prompt in a left-padded batch gets exactly the logits, memory
and generated tokens of the same prompt alone. Padding positions get zero logits and hidden
states, and the logit of a padding position scores no loss.

Truncated back-propagation through time (``bptt_depth`` K): let t* be the last segment that
holds a loss (a label other than -100 after the causal shift; the last segment when no labels
are given). The memory read by segment t*-K+1 and by every earlier segment is detached, so the
loss of segment t* back-propagates through segments t*-K+1..t* exactly, and no loss
back-propagates through more than K segments. (An exact window of K for the loss of *every*
segment at once would need K backward passes per segment.) Segments that hold no loss and lie
before the window run without autograd, which bounds training memory by K segments.

Generation (``generate``) is transformers' own ``GenerationMixin.generate``, with every decoding
strategy and argument it has except those that roll the state back (assisted decoding): the
recurrence lives in a :class:`~hf_longctx.memory.cache.RecurrentMemoryCache`, which ``generate``
carries from step to step and reorders with the beams (one state per row once padding came, so
that every row closes its segments at its own steps). A cached call appends its tokens to the open
segment (the read memory goes in front of the segment's first token, the write slots after its
``segment_length``-th), so the tokens equal those of re-running :meth:`forward` on the whole sequence
at every step (``use_cache=False``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, GenerationConfig, GenerationMixin
from transformers.generation.configuration_utils import GenerationMode
from transformers.utils import ModelOutput

from ..config_base import SpecError
from ..patching import Applied, Technique, register_technique
from .cache import CACHE_KWARG, RecurrentMemoryCache
from .config import MemorySpec

logger = logging.getLogger(__name__)

EXTRA_KEY = "memory_embeddings"  # name of the memory parameter in hf_longctx_extra.safetensors


@dataclass
class RecurrentMemoryOutput(ModelOutput):
    """Output of :class:`RecurrentMemoryModel`.

    loss: scalar causal-LM loss over the real tokens (labels shifted as in transformers), or None.
    logits: ``[B, K, V]`` logits of the real tokens (memory positions removed): all N input tokens, or
        the last ``logits_to_keep``.
    hidden_states: with ``output_hidden_states``, the embedding output and every layer's output at the
        real tokens' positions, each ``[B, N, H]``.
    memory: ``[B, M, H]`` memory written by the last segment (read memory of the next call); None for a
        cached call, whose state is in the returned cache.
    A cached call also returns its :class:`RecurrentMemoryCache` under ``CACHE_KWARG`` (``output.cache``).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    memory: torch.Tensor | None = None


class _Piece(NamedTuple):
    """One base-model call on consecutive tokens of one segment."""

    logits: torch.Tensor  # [B, k, V]: the kept tokens' logits
    hidden_states: tuple[torch.Tensor, ...] | None  # per layer [B, n, H] at the tokens, if asked for
    written: torch.Tensor | None  # [B, M, H]: the new memory, when the piece closed the segment
    cache: Cache | None  # the base model's cache of the segment so far (cached calls)


class RecurrentMemoryModel(nn.Module, GenerationMixin):
    """A causal LM reading and writing ``memory_tokens`` learned memory vectors per segment.

    Built by ``hf_longctx.patch(model, {"memory": {...}})``; see the module docstring for the
    segment layout, the position policy, truncated BPTT and generation. The wrapped transformers model
    is ``hf_longctx_base`` (a submodule: ``parameters()``, ``to()``, ``train()`` cover both).
    LoRA: apply PEFT to ``wrapper.hf_longctx_base``; the memory parameter stays trainable.
    """

    main_input_name = "input_ids"
    # Assisted decoding rolls the state back to a token, which a closed segment cannot do: generate refuses it.
    _supported_generation_modes = (
        GenerationMode.GREEDY_SEARCH,
        GenerationMode.SAMPLE,
        GenerationMode.BEAM_SEARCH,
        GenerationMode.BEAM_SAMPLE,
    )

    def __init__(self, model: nn.Module, spec: MemorySpec):
        super().__init__()
        self.model = model
        self.memory_tokens = spec.memory_tokens
        self.segment_length = spec.segment_length
        self.bptt_depth = spec.bptt_depth
        embedding = model.get_input_embeddings().weight
        init = torch.randn(spec.memory_tokens, embedding.shape[1], device=embedding.device) * embedding.detach().float().std()
        self.memory = nn.Parameter(init.to(embedding.dtype))  # [M, H]: the read memory of the first segment

    # -- integration with the patching core, the hub and GenerationMixin ---------------------------

    @property
    def hf_longctx_base(self) -> nn.Module:
        return self.model

    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self) -> GenerationConfig:
        """The base model's generation config: the defaults of ``generate``, saved and loaded with the model."""
        return self.model.generation_config

    @generation_config.setter
    def generation_config(self, value: GenerationConfig) -> None:
        self.model.generation_config = value

    @property
    def device(self) -> torch.device:
        return self.memory.device

    @property
    def dtype(self) -> torch.dtype:
        return self.memory.dtype

    @classmethod
    def is_remote_code(cls) -> bool:
        """Asked by ``generate`` (as of a ``PreTrainedModel``): this class is never code loaded from the Hub."""
        return False

    def get_experts_implementation(self) -> dict[str, str | None]:
        """The base model's MoE experts implementation (``generate`` switches it for decoding off the CPU)."""
        return self.model.get_experts_implementation()

    def set_experts_implementation(self, experts_implementation: str | dict) -> None:
        self.model.set_experts_implementation(experts_implementation)

    def hf_longctx_extra_state_dict(self) -> dict[str, torch.Tensor]:
        """The wrapper's own tensors, saved next to the base weights: ``{"memory_embeddings": [M, H]}``."""
        return {EXTRA_KEY: self.memory}

    def load_hf_longctx_extra_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if set(state_dict) != {EXTRA_KEY}:
            raise KeyError(f"expected exactly the key '{EXTRA_KEY}' in the memory state dict, got {sorted(state_dict)}")
        value = state_dict[EXTRA_KEY]
        if value.shape != self.memory.shape:
            raise ValueError(
                f"saved memory embeddings have shape {tuple(value.shape)}, but this model has "
                f"memory_tokens={self.memory_tokens} and hidden size {self.memory.shape[1]}: {tuple(self.memory.shape)}"
            )
        with torch.no_grad():
            self.memory.copy_(value.to(self.memory.dtype))

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> Path:
        """``hf_longctx.save_pretrained``: base weights, config with the spec, generation config, memory embeddings."""
        from ..hub import save_pretrained

        return save_pretrained(self, path, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """``hf_longctx.push_to_hub``: save, write a model card, upload."""
        from ..hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, **kwargs: Any) -> "RecurrentMemoryModel":
        """``hf_longctx.from_pretrained`` for a checkpoint saved with a ``memory`` section."""
        from ..hub import from_pretrained

        model = from_pretrained(path_or_repo, **kwargs)
        if not isinstance(model, cls):
            raise ValueError(f"'{path_or_repo}' holds no 'memory' patch; it loads as {type(model).__name__}")
        return model

    # -- forward ----------------------------------------------------------------------------------

    def _piece(
        self,
        memory: torch.Tensor,
        embeds: torch.Tensor,
        state: RecurrentMemoryCache | None,
        close: bool,
        keep: range,
        hidden: bool,
    ) -> _Piece:
        """Run the next tokens of one segment through the base model.

        ``memory`` ``[B, M, H]`` is the segment's read memory, also the input of its write slots;
        ``embeds`` ``[B, n, H]`` are its next n tokens (no padding: padded batches run row by row).
        ``state`` holds the segment's earlier tokens on a base-model cache; when it holds none (or is
        None: no cache is kept), the tokens open the segment and the read memory goes in front of them.
        ``close``: the write slots follow the tokens, and their last hidden states (after the final
        norm) are the new memory.
        ``keep``: the tokens (0..n-1) whose logits are computed.
        """
        n = embeds.shape[1]
        opens = state is None or state.filled == 0
        inputs = [memory, embeds] if opens else [embeds]
        if close:
            inputs.append(memory)
        start = self.memory_tokens if opens else 0  # index of the first token in this call's input
        out = self.model(
            inputs_embeds=torch.cat(inputs, dim=1),
            use_cache=state is not None,
            output_hidden_states=hidden or close,
            logits_to_keep=torch.arange(start + keep.start, start + keep.stop, device=embeds.device),
            **{CACHE_KWARG: None if opens else state.segment},
        )
        return _Piece(
            logits=out.logits,
            hidden_states=tuple(h[:, start : start + n] for h in out.hidden_states) if hidden else None,
            written=out.hidden_states[-1][:, start + n :] if close else None,
            cache=out[CACHE_KWARG] if state is not None else None,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> RecurrentMemoryOutput:
        """Segment-recurrent forward pass, whole (training, ``use_cache=False``) or cached (generation).

        input_ids ``[B, N]`` (or inputs_embeds ``[B, N, H]``); attention_mask ``[B, N]`` (1 = token,
        0 = padding, which no segment holds: each row is segmented by its own tokens; a cached call may
        give the mask of every token so far, ``[B, seen + N]``); labels
        ``[B, N]`` (-100 = ignored), shifted inside as in transformers; memory ``[B, M, H]`` is the read
        memory of the first segment (default: the learned memory), e.g. a previous call's
        ``output.memory``; a cached call reads it only when its cache is empty.
        ``cache=`` (the keyword named by ``CACHE_KWARG``), a :class:`RecurrentMemoryCache`, continues its
        open segment and comes back in the output; ``use_cache=True`` without one starts a new one, and so
        does an empty cache of another class (the ``DynamicCache`` that ``generate`` offers). ``logits_to_keep`` k > 0 computes only the last k
        logits. ``return_dict`` is accepted for ``generate``'s calling convention: the output is always a
        :class:`RecurrentMemoryOutput`. Other ``kwargs`` (``num_items_in_batch``) go to the base model's
        loss function.
        """
        cache = kwargs.pop(CACHE_KWARG, None)
        if output_attentions:
            raise ValueError(
                "output_attentions=True is not available for RecurrentMemoryModel: every segment attends over "
                "its own keys (read memory and tokens), so there is no [B, heads, N, N] attention map"
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 keeps every logit), got {logits_to_keep!r}")
        if labels is not None and logits_to_keep:
            raise ValueError(f"labels need every token's logits, but logits_to_keep={logits_to_keep}")
        if inputs_embeds is None:
            inputs_embeds = self.model.get_input_embeddings()(input_ids)
        batch, total = inputs_embeds.shape[:2]
        keep = range(max(total - logits_to_keep, 0) if logits_to_keep else 0, total)
        if memory is None:
            memory = self.memory[None].expand(batch, -1, -1)
        if attention_mask is not None:
            attention_mask = attention_mask[:, -total:]
        padded = attention_mask is not None and not bool(attention_mask.all())
        hidden = bool(output_hidden_states)

        if cache is not None or use_cache:
            if labels is not None:
                raise ValueError("labels are for the training forward pass, without a cache (use_cache=False)")
            cache = _memory_cache(cache)
            if cache.memory is None:
                cache.memory = memory
            if padded or cache.rows is not None:
                rows = cache.split_rows(batch)
                logits, hidden_states, _ = self._by_row(
                    inputs_embeds, attention_mask, keep, hidden,
                    lambda b, embeds, kept, _cols: (*_gather(self._cached(embeds, rows[b], kept, hidden)), None),
                )
                cache.seen += total
            else:
                logits, hidden_states = _gather(self._cached(inputs_embeds, cache, keep, hidden))
            output = RecurrentMemoryOutput(logits=logits, hidden_states=hidden_states)
            output[CACHE_KWARG] = cache
            return output

        if padded:
            if labels is not None:  # the logit of a padding position scores nothing
                labels = labels.masked_fill(F.pad(attention_mask[:, :-1] == 0, (1, 0), value=False), -100)
            scored = None if labels is None else F.pad(labels[:, 1:] != -100, (0, 1), value=False)  # [B, N]
            logits, hidden_states, written = self._by_row(
                inputs_embeds, attention_mask, keep, hidden,
                lambda b, embeds, kept, cols: self._segments(
                    embeds, memory[b : b + 1], None if scored is None else scored[b, cols], kept, hidden),
            )
            memory = torch.cat([memory[b : b + 1] if w is None else w for b, w in enumerate(written)])
        else:
            # The logit at position i is scored against labels[i + 1]: it belongs to i's segment.
            scored = None if labels is None else F.pad((labels[:, 1:] != -100).any(dim=0), (0, 1), value=False)
            logits, hidden_states, memory = self._segments(inputs_embeds, memory, scored, keep, hidden)
        loss = None
        if labels is not None:
            loss = self.model.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return RecurrentMemoryOutput(loss=loss, logits=logits, hidden_states=hidden_states, memory=memory)

    def _segments(
        self, embeds: torch.Tensor, memory: torch.Tensor, scored: torch.Tensor | None, keep: range, hidden: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, torch.Tensor]:
        """The whole (uncached) forward pass of ``embeds`` ``[B, N, H]`` (no padding) from the read memory
        ``memory`` ``[B, M, H]``, with truncated BPTT; ``scored`` ``[N]`` (None: no labels) says which tokens'
        logits hold a loss. Returns the kept logits, the hidden states and the memory the last segment wrote."""
        total = embeds.shape[1]
        starts = range(0, total, self.segment_length)
        has_loss = [True] * len(starts)
        if scored is not None:
            # Padded to whole segments, so that one reduction (one device-to-host copy) covers them all.
            scored = F.pad(scored, (0, len(starts) * self.segment_length - total))
            has_loss = scored.view(len(starts), self.segment_length).any(dim=1).tolist()
        last_loss = max((t for t, flag in enumerate(has_loss) if flag), default=len(starts) - 1)
        detach_upto = -1 if self.bptt_depth is None else last_loss - self.bptt_depth + 1

        pieces = []
        for t, start in enumerate(starts):
            if t <= detach_upto:
                memory = memory.detach()
            end = start + self.segment_length
            needs_graph = has_loss[t] or t >= detach_upto
            with torch.set_grad_enabled(torch.is_grad_enabled() and needs_graph):
                piece = self._piece(memory, embeds[:, start:end], None, True, _within(keep, start, end), hidden)
            memory = piece.written
            pieces.append(piece)
        return (*_gather(pieces), memory)

    def _by_row(self, embeds: torch.Tensor, mask: torch.Tensor, keep: range, hidden: bool, run: Callable):
        """A padded batch, each row alone on its own real tokens: ``run(b, embeds [1, r, H], kept, columns)``
        gives row b's ``(logits [1, k, V], hidden states per layer [1, r, H] or None, memory [1, M, H] or
        None)`` for its r real tokens at ``columns`` ``[r]`` of ``mask`` ``[B, N]``, ``kept`` the range of
        them whose logits are kept. The logits and hidden states go back to the rows' columns, zeros at
        padding (its logits score nothing); returns them ``[B, len(keep), V]`` and per layer ``[B, N, H]``,
        and the rows' memories (None for a row without a real token)."""
        results, placed = [], []
        for b in range(embeds.shape[0]):
            columns = mask[b].nonzero()[:, 0]
            bounds = torch.tensor([keep.start, keep.stop], device=columns.device)
            kept = range(*torch.searchsorted(columns, bounds).tolist())
            results.append(run(b, embeds[b : b + 1, columns], kept, columns) if len(columns) else None)
            placed.append((columns, columns[kept.start : kept.stop] - keep.start))
        if all(result is None for result in results):
            raise ValueError("the attention_mask holds no real token in any row")
        logits_like, hidden_like, _ = next(result for result in results if result is not None)
        logits = torch.stack([
            logits_like.new_zeros(len(keep), logits_like.shape[-1]).index_copy(0, at, result[0][0])
            if result is not None else logits_like.new_zeros(len(keep), logits_like.shape[-1])
            for result, (_, at) in zip(results, placed)
        ])
        hidden_states = None
        if hidden:
            hidden_states = tuple(
                torch.stack([
                    like.new_zeros(embeds.shape[1], like.shape[-1]).index_copy(0, columns, result[1][i][0])
                    if result is not None else like.new_zeros(embeds.shape[1], like.shape[-1])
                    for result, (columns, _) in zip(results, placed)
                ])
                for i, like in enumerate(hidden_like)
            )
        return logits, hidden_states, [None if result is None else result[2] for result in results]

    def _cached(self, embeds: torch.Tensor, cache: RecurrentMemoryCache, keep: range, hidden: bool) -> list[_Piece]:
        """Append ``embeds`` ``[B, n, H]`` (no padding) to the cache's open segment, closing
        every segment that reaches ``segment_length`` tokens; one base-model call per segment touched."""
        pieces = []
        done, total = 0, embeds.shape[1]
        while done < total:
            end = done + min(self.segment_length - cache.filled, total - done)
            close = cache.filled + end - done == self.segment_length
            piece = self._piece(
                cache.memory, embeds[:, done:end], cache, close, _within(keep, done, end), hidden
            )
            if close:
                cache.memory, cache.segment, cache.filled = piece.written, None, 0
            else:
                cache.segment, cache.filled = piece.cache, cache.filled + end - done
            cache.seen += end - done
            pieces.append(piece)
            done = end
        return pieces


def _memory_cache(cache: Cache | None) -> RecurrentMemoryCache:
    """The cache a cached call continues: the given RecurrentMemoryCache, or a new one in place of none or
    of an empty cache of another class (``generate`` offers an empty ``DynamicCache``)."""
    if isinstance(cache, RecurrentMemoryCache):
        return cache
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            f"RecurrentMemoryModel keeps its state in a RecurrentMemoryCache; got a {type(cache).__name__} that "
            f"already holds {cache.get_seq_length()} tokens"
        )
    return RecurrentMemoryCache()


def _gather(pieces: list[_Piece]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The pieces' logits ``[B, K, V]`` and hidden states (per layer ``[B, N, H]``, or None) joined along the tokens."""
    hidden = None
    if pieces[0].hidden_states is not None:
        hidden = tuple(torch.cat(layer, dim=1) for layer in zip(*(p.hidden_states for p in pieces)))
    return torch.cat([p.logits for p in pieces], dim=1), hidden


def _within(keep: range, start: int, end: int) -> range:
    """The positions of ``keep`` in ``[start, end)``, counted from ``start``."""
    low, high = max(keep.start, start), min(keep.stop, end)
    return range(low - start, max(high, low) - start)


def _check(model: nn.Module, section: MemorySpec, spec) -> None:
    if getattr(model.config, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
        raise SpecError(
            f"'memory' needs a causal LM with an LM head (a *ForCausalLM), got {type(model).__name__}"
        )


def _apply(model: nn.Module, section: MemorySpec, spec) -> Applied:
    span = section.segment_length + 2 * section.memory_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and span > limit:
        logger.warning(
            "memory: a segment spans %d positions (segment_length %d + 2 x memory_tokens %d) but the model "
            "was trained on %d; positions beyond that are extrapolated",
            span, section.segment_length, section.memory_tokens, limit,
        )
    # The wrapper changes nothing inside the model: undoing it is dropping the wrapper.
    return Applied(undo=lambda: None, model=RecurrentMemoryModel(model, section))


def _card(params: dict, model=None) -> list[str]:
    segment_length = MemorySpec.from_dict(params).segment_length
    return [f"- **Input length:** unbounded: segments of {segment_length} tokens linked by recurrent memory tokens"]


register_technique(
    Technique(section="memory", spec_class=MemorySpec, apply=_apply, check=_check, order=90, card=_card)
)
