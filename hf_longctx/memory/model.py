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
cost per token does not grow with the input length. Padding (``attention_mask`` 0) is masked
out but keeps its position, as in the base model's own forward pass (RoPE only sees relative
distances, so the shift from left padding does not change the logits); a segment that is all
padding for a sample leaves that sample's memory unchanged.

Truncated back-propagation through time (``bptt_depth`` K): let t* be the last segment that
holds a loss (a label other than -100 after the causal shift; the last segment when no labels
are given). The memory read by segment t*-K+1 and by every earlier segment is detached, so the
loss of segment t* back-propagates through segments t*-K+1..t* exactly, and no loss
back-propagates through more than K segments. (An exact window of K for the loss of *every*
segment at once would need K backward passes per segment.) Segments that hold no loss and lie
before the window run without autograd, which bounds training memory by K segments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

from .. import compat
from ..config_base import SpecError
from ..patching import Applied, Technique, register_technique
from .config import MemorySpec

logger = logging.getLogger(__name__)

EXTRA_KEY = "memory_embeddings"  # name of the memory parameter in hf_longctx_extra.safetensors
_GENERATE_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id", "pad_token_id")


@dataclass
class RecurrentMemoryOutput(ModelOutput):
    """Output of :class:`RecurrentMemoryModel`.

    loss: scalar causal-LM loss over the real tokens (labels shifted as in transformers), or None.
    logits: ``[B, N, V]`` logits of the N real tokens (memory positions removed).
    memory: ``[B, M, H]`` memory written by the last segment (read memory of the next call).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memory: torch.Tensor | None = None


class RecurrentMemoryModel(nn.Module):
    """A causal LM reading and writing ``memory_tokens`` learned memory vectors per segment.

    Built by ``hf_longctx.patch(model, {"memory": {...}})``; see the module docstring for the
    segment layout, the position policy and truncated BPTT. The wrapped transformers model is
    ``hf_longctx_base`` (a submodule: ``parameters()``, ``to()``, ``train()`` cover both).
    LoRA: apply PEFT to ``wrapper.hf_longctx_base``; the memory parameter stays trainable.
    """

    def __init__(self, model: nn.Module, spec: MemorySpec):
        super().__init__()
        self.model = model
        self.memory_tokens = spec.memory_tokens
        self.segment_length = spec.segment_length
        self.bptt_depth = spec.bptt_depth
        embedding = model.get_input_embeddings().weight
        init = torch.randn(spec.memory_tokens, embedding.shape[1], device=embedding.device) * embedding.detach().float().std()
        self.memory = nn.Parameter(init.to(embedding.dtype))  # [M, H]: the read memory of the first segment

    # -- integration with the patching core and the hub -------------------------------------------

    @property
    def hf_longctx_base(self) -> nn.Module:
        return self.model

    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        return self.memory.device

    @property
    def dtype(self) -> torch.dtype:
        return self.memory.dtype

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
        """``hf_longctx.save_pretrained``: base weights, config with the spec, memory embeddings (safetensors)."""
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

    def _run(self, embeds, mask, cache=None, logits_to_keep: int | torch.Tensor = 1, hidden: bool = False):
        """One call of the base model on ``embeds`` ``[B, n, H]``; ``mask`` ``[B, cached + n]`` or None.

        Positions are the model's default: ``cached .. cached + n - 1`` (segment-local).
        """
        return self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            **{compat.CACHE: cache},
            use_cache=cache is not None,
            output_hidden_states=hidden,
            logits_to_keep=logits_to_keep,
        )

    def _segment(self, memory, embeds, mask):
        """Run one segment: ``memory`` ``[B, M, H]``, ``embeds`` ``[B, l, H]``, ``mask`` ``[B, l]`` or None.

        Returns the tokens' logits ``[B, l, V]`` and the written memory ``[B, M, H]``.
        """
        batch, length = embeds.shape[:2]
        m = self.memory_tokens
        full_mask = None
        if mask is not None:
            ones = mask.new_ones(batch, m)
            full_mask = torch.cat([ones, mask, ones], dim=1)
        out = self._run(
            torch.cat([memory, embeds, memory], dim=1),
            full_mask,
            logits_to_keep=torch.arange(m, m + length, device=embeds.device),
            hidden=True,
        )
        written = out.hidden_states[-1][:, m + length :]
        return out.logits, written if mask is None else _keep_memory_of_empty(written, memory, mask)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        **loss_kwargs: Any,
    ) -> RecurrentMemoryOutput:
        """Segment-recurrent forward pass.

        input_ids ``[B, N]`` (or inputs_embeds ``[B, N, H]``); attention_mask ``[B, N]`` (1 = token,
        0 = padding); labels ``[B, N]`` (-100 = ignored), shifted inside as in transformers; memory
        ``[B, M, H]`` continues from a previous call's ``output.memory`` (default: the learned memory).
        ``loss_kwargs`` (``num_items_in_batch``) go to the base model's loss function.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.get_input_embeddings()(input_ids)
        batch, total = inputs_embeds.shape[:2]
        if memory is None:
            memory = self.memory[None].expand(batch, -1, -1)
        starts = range(0, total, self.segment_length)
        has_loss = [True] * len(starts)
        if labels is not None:
            # The logit at position i is scored against labels[i + 1]: it belongs to i's segment.
            # Padded to whole segments, so that one reduction (one device-to-host copy) covers them all.
            scored = (labels[:, 1:] != -100).any(dim=0)
            scored = torch.nn.functional.pad(scored, (0, len(starts) * self.segment_length - scored.shape[0]))
            has_loss = scored.view(len(starts), self.segment_length).any(dim=1).tolist()
        last_loss = max((t for t, flag in enumerate(has_loss) if flag), default=len(starts) - 1)
        detach_upto = -1 if self.bptt_depth is None else last_loss - self.bptt_depth + 1

        logits = []
        for t, start in enumerate(starts):
            if t <= detach_upto:
                memory = memory.detach()
            end = start + self.segment_length
            needs_graph = has_loss[t] or t >= detach_upto
            with torch.set_grad_enabled(torch.is_grad_enabled() and needs_graph):
                segment_mask = None if attention_mask is None else attention_mask[:, start:end]
                segment_logits, memory = self._segment(memory, inputs_embeds[:, start:end], segment_mask)
            logits.append(segment_logits)
        logits = torch.cat(logits, dim=1)
        loss = None
        if labels is not None:
            loss = self.model.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return RecurrentMemoryOutput(loss=loss, logits=logits, memory=memory)

    # -- generation -------------------------------------------------------------------------------

    def _logits_processors(self, options: dict[str, Any]) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if options["repetition_penalty"] not in (None, 1.0):
            processors.append(RepetitionPenaltyLogitsProcessor(options["repetition_penalty"]))
        if options["do_sample"]:
            if options["temperature"] not in (None, 1.0):
                processors.append(TemperatureLogitsWarper(options["temperature"]))
            if options["top_k"]:
                processors.append(TopKLogitsWarper(options["top_k"]))
            if options["top_p"] not in (None, 1.0):
                processors.append(TopPLogitsWarper(options["top_p"]))
        return processors

    @torch.no_grad()
    def generate(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.LongTensor:
        """Greedy or sampled decoding that goes on across segment boundaries.

        ``input_ids`` ``[B, P]`` (left-padded with ``attention_mask`` ``[B, P]`` for uneven prompts);
        returns ``[B, P + new]``. Options (defaults from ``generation_config``): max_new_tokens,
        do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id.
        Within a segment a KV cache holds the read memory and the segment's tokens; when the segment
        holds ``segment_length`` tokens its write slots run on that cache, their hidden states become
        the memory, and the next segment starts on a fresh cache. The tokens equal those of re-running
        :meth:`forward` on the whole sequence at every step.
        """
        unknown = sorted(set(kwargs) - set(_GENERATE_KEYS))
        if unknown:
            raise ValueError(f"unsupported generate arguments {unknown}; supported: {', '.join(_GENERATE_KEYS)}")
        options = {key: kwargs.get(key, getattr(self.generation_config, key, None)) for key in _GENERATE_KEYS}
        if options["max_new_tokens"] is None:
            options["max_new_tokens"] = 20
        eos = options["eos_token_id"]
        eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=input_ids.device)
        pad = options["pad_token_id"] if options["pad_token_id"] is not None else (eos[0].item() if len(eos) else 0)
        processors = self._logits_processors(options)

        decoder = _SegmentDecoder(self, input_ids.shape[0])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        next_logits = decoder.feed(input_ids, attention_mask)
        sequences = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(options["max_new_tokens"]):
            scores = processors(sequences, next_logits.float())
            if options["do_sample"]:
                token = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
            else:
                token = scores.argmax(dim=-1)
            token = torch.where(finished, torch.full_like(token, pad), token)
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            finished |= torch.isin(token, eos)
            if finished.all():
                break
            next_logits = decoder.feed(token[:, None], torch.ones_like(token[:, None]))
        return sequences


def _keep_memory_of_empty(written: torch.Tensor, memory: torch.Tensor, segment_mask: torch.Tensor) -> torch.Tensor:
    """The new memory ``[B, M, H]``: a sample whose segment is all padding (``segment_mask`` ``[B, l]``)
    keeps its previous memory."""
    return torch.where(segment_mask.any(dim=1)[:, None, None], written, memory)


class _SegmentDecoder:
    """Incremental segment state for :meth:`RecurrentMemoryModel.generate`.

    Holds the memory ``[B, M, H]``, the KV cache of the open segment (read memory + its tokens),
    the segment's attention mask and how many tokens it holds.
    """

    def __init__(self, wrapper: RecurrentMemoryModel, batch: int):
        self.wrapper = wrapper
        self.memory = wrapper.memory[None].expand(batch, -1, -1)
        self._open()

    def _open(self) -> None:
        """Start a segment: a fresh cache that holds only the read memory."""
        batch, m = self.memory.shape[:2]
        self.cache, self.filled = None, 0
        self.mask = torch.ones(batch, m, dtype=torch.long, device=self.memory.device)
        if m:
            self._step(self.memory)

    def _step(self, embeds, hidden: bool = False):
        """Run ``embeds`` ``[B, n, H]`` on the segment's cache; ``self.mask`` already covers them."""
        cache = DynamicCache() if self.cache is None else self.cache
        out = self.wrapper._run(embeds, self.mask, cache, hidden=hidden)
        self.cache = compat.cache_of(out)
        return out

    def feed(self, input_ids: torch.LongTensor, mask: torch.Tensor) -> torch.Tensor:
        """Append tokens ``[B, n]`` (crossing segment boundaries); returns the last token's logits ``[B, V]``."""
        embed = self.wrapper.model.get_input_embeddings()
        length = self.wrapper.segment_length
        start = 0
        while start < input_ids.shape[1]:
            end = start + min(length - self.filled, input_ids.shape[1] - start)
            self.mask = torch.cat([self.mask, mask[:, start:end]], dim=1)
            logits = self._step(embed(input_ids[:, start:end])).logits[:, -1]
            self.filled += end - start
            if self.filled == length:
                self._write()
            start = end
        return logits

    def _write(self) -> None:
        """Run the write slots of the full segment; their last hidden states become the memory."""
        m = self.memory.shape[1]
        if m:
            segment_mask = self.mask[:, m:]
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], m)], dim=1)
            written = self._step(self.memory, hidden=True).hidden_states[-1]
            self.memory = _keep_memory_of_empty(written, self.memory, segment_mask)
        self._open()


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


def _card(params: dict) -> list[str]:
    segment_length = MemorySpec.from_dict(params).segment_length
    return [f"- **Input length:** unbounded: segments of {segment_length} tokens linked by recurrent memory tokens"]


register_technique(
    Technique(section="memory", spec_class=MemorySpec, apply=_apply, check=_check, order=90, card=_card)
)
