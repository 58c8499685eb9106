"""Tiny random models of every supported family, built from configs (no downloads).

Used by the tests, the benchmarks and the demo; ``cpu_name`` labels the benchmarks' tables.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .families import get_family

_SIZES: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=128,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(model_type: str, **overrides: Any):
    """A small config of ``model_type`` (hidden 64, 2 layers, 4 heads, 2 KV heads, 64 trained positions)."""
    kwargs = dict(_SIZES)
    if model_type == "gpt_neox":
        kwargs.update(use_parallel_residual=True)
    else:
        kwargs.update(num_key_value_heads=2, head_dim=16)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    get_family(config)
    return config


def tiny_model(model_type: str = "llama", seed: int = 0, dtype=torch.float32, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny causal LM in eval mode, identical for the same seed and overrides."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves some weights tiny (e.g. zero biases); widen them so tests see every path.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1 and torch.all(param == 0):
                param.normal_(0.0, 0.02)
    return model.eval()


def mixtral_block(moe, implementation: str = "eager"):
    """transformers' own ``MixtralSparseMoeBlock`` holding the weights of an upcycled ``SparseMoeBlock``.

    ``implementation`` is Mixtral's experts implementation (``"eager"``: its loop over experts, the
    plainest reference; ``"grouped_mm"``). Used as the oracle in tests and the baseline in benchmarks.
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    experts = moe.experts
    config = MixtralConfig(
        hidden_size=experts.down_proj.shape[1],
        intermediate_size=experts.down_proj.shape[-1],
        num_local_experts=experts.num_experts,
        num_experts_per_tok=moe.gate.top_k,
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config).to(experts.down_proj.device)
    with torch.no_grad():
        block.gate.weight.copy_(moe.gate.weight)
        block.experts.gate_up_proj.copy_(experts.gate_up_proj)
        block.experts.down_proj.copy_(experts.down_proj)
    return block


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"
