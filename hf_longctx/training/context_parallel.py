"""Context parallelism: one sequence sharded over several GPUs, through accelerate (torch's ring attention).

The recipe option ``context_parallel_size: n`` becomes accelerate's ``ParallelismConfig(cp_size=n,
dp_shard_size=world_size / n)`` with FSDP2: ranks in groups of ``n`` share one batch, each holds
``1 / n`` of every sequence, and torch's ``context_parallel`` exchanges keys and values between
them inside ``scaled_dot_product_attention``. transformers' ``Trainer`` drives it: before the
sequence is sharded it shifts the labels into ``shift_labels`` (so no label crosses a shard
boundary) and counts the loss tokens of the whole step (``num_items_in_batch``, over every
gradient-accumulation micro-batch); the ``loss`` patch then computes the chunked loss of the
local tokens against ``shift_labels`` divided by that count, and FSDP's gradient reduction over
the ``dp_shard x cp`` mesh sums the shards (``tests/test_context_parallel.py`` checks the sum on
two processes against the unsharded loss).

What the engine cannot do exactly is refused by :func:`check_context_parallel` at start-up,
before any data is read:

- attention other than full causal SDPA: accelerate drops every attention mask and sets
  ``is_causal``, and torch intercepts only the CUDA SDPA kernels. So sliding windows (a
  ``sliding_window`` config, ``layer_types`` other than full attention, the ``attention`` patch),
  ALiBi and other biases, attention sinks (``sinks`` parameters, the ``attention`` patch's sink
  tokens), position remapping (``extend``), recurrent memory, any ``attn_implementation`` but
  ``sdpa``, and a machine without CUDA, where each rank would attend within its own shard only;
- packed sequences (several documents per sequence): their block-diagonal mask is one of the
  masks dropped, so documents would attend to each other. With context parallelism the recipe
  needs ``packing: false`` (each sequence is one document's ``context_length`` tokens);
- a sequence length that is not a multiple of ``2 x n`` (torch balances the causal work by
  giving each rank one chunk from the front and one from the back), a world size that is not a
  multiple of ``n``, a launch without FSDP2.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..patching import applied_sections
from .fsdp import fsdp_requested

logger = logging.getLogger(__name__)

# Sections whose attention is not the plain causal SDPA that torch's context parallelism shards.
_REFUSED_SECTIONS = {
    "alibi": "ALiBi adds a bias to the attention scores, which the context-parallel SDPA cannot take",
    "attention": "its attention function (sliding window, sink tokens, learnable sinks or another backend) runs "
                 "outside the SDPA kernels that context parallelism shards",
    "extend": "it remaps positions inside the attention function, outside the SDPA kernels that context "
              "parallelism shards",
    "memory": "recurrent memory carries state from segment to segment along the sequence",
}


def context_parallel_obstacles(model: nn.Module) -> list[str]:
    """Why ``model`` (patched, as it will train) cannot run under torch's context parallelism; empty if it can."""
    obstacles = []
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    implementation = getattr(model.config, "_attn_implementation", None)
    sections = applied_sections(model)
    for section, reason in _REFUSED_SECTIONS.items():
        if section in sections:
            obstacles.append(f"the '{section}' patch: {reason}")
    if implementation != "sdpa" and not ({"alibi", "attention"} & set(sections)):
        obstacles.append(f"attn_implementation '{implementation}': context parallelism shards only 'sdpa'")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        kinds = sorted(set(layer_types) - {"full_attention"})
        obstacles.append(f"layers of type {', '.join(kinds)} (layer_types): their masks would be dropped for full "
                         "causal attention")
    elif layer_types is None and getattr(config, "sliding_window", None) is not None and getattr(
            config, "use_sliding_window", True):
        obstacles.append(f"a sliding window of {config.sliding_window} tokens in the config: its mask would be "
                         "dropped for full causal attention")
    if getattr(config, "attention_chunk_size", None):
        obstacles.append(f"chunked attention (attention_chunk_size {config.attention_chunk_size})")
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", None) == "alibi":
        obstacles.append("native ALiBi biases, which the context-parallel SDPA cannot take")
    if any(name.split(".")[-1] in ("sinks", "s_aux") for name, _ in model.named_parameters()):
        obstacles.append("attention sink logits, which SDPA cannot express")
    if not getattr(model, "_supports_context_parallel", True):
        obstacles.append(f"{type(model).__name__} declares that it cannot run under context parallelism")
    return obstacles


def check_context_parallel(model: nn.Module, context_parallel_size: int, context_length: int, packing: bool,
                           world_size: int | None = None, cuda: bool | None = None) -> None:
    """Raise ValueError, naming every reason, unless the run can use ``context_parallel_size`` exactly."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    cuda = torch.cuda.is_available() if cuda is None else cuda
    n = context_parallel_size
    reasons = []
    if not cuda:
        reasons.append("no CUDA device: torch's context-parallel attention intercepts only the CUDA SDPA kernels "
                       "(flash, efficient, cuDNN), so each rank would attend within its own shard only")
    if not fsdp_requested() or os.environ.get("FSDP_VERSION", "1") != "2":
        reasons.append("the launch is not FSDP2: use an accelerate config with distributed_type: FSDP and "
                       "fsdp_version: 2 (recipes/accelerate/fsdp2-8gpu-cp.yaml)")
    if world_size % n:
        reasons.append(f"{world_size} processes cannot be split into context-parallel groups of {n}")
    if context_length % (2 * n):
        reasons.append(f"context_length {context_length} is not a multiple of 2 x {n} (each rank takes one chunk "
                       "from the front and one from the back of every sequence)")
    if packing:
        reasons.append("packing: true puts several documents in one sequence, and their block-diagonal mask is "
                       "dropped under context parallelism (documents would attend to each other); set "
                       "packing: false")
    reasons += context_parallel_obstacles(model)
    if reasons:
        raise ValueError(f"context_parallel_size {n} cannot be used exactly: " + "; ".join(reasons))


def parallelism_config(context_parallel_size: int, world_size: int):
    """accelerate's ``ParallelismConfig`` for ``context_parallel_size`` ranks per sequence, FSDP over the rest."""
    from accelerate import ParallelismConfig

    return ParallelismConfig(dp_shard_size=world_size // context_parallel_size, cp_size=context_parallel_size)
