"""Tiny random models of every supported family, built from configs (no downloads).

Used by the tests, the benchmarks and the demo; ``cpu_name`` labels the benchmarks' tables.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel


_SIZES: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Sizes of the keys that MoE, MLA and partial-rotary configs add (each set only where the config has it).
_EXTRA_SIZES: dict[str, Any] = dict(
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    rotary_dim=8,
    mamba_n_heads=8,  # Mamba-2 mixers of hybrid models: 8 heads of 16 = expand 2 x hidden 64
    mamba_d_head=16,
    mamba_d_ssm=128,
    mamba_d_state=16,
    mamba_chunk_size=16,
    intermediate_size_mlp=128,
    laurel_rank=8,
)
# Where a model type's layer pattern is not a per-layer list (or is one that the sampling misreads), the layers
# that give its tiny model one layer of each kind, and sizes of keys only it has.
_FAMILY_SIZES: dict[str, dict[str, Any]] = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], shared_intermediate_size=32),
    # the last layer reuses the cache of an earlier one of its type
    "gemma3n_text": dict(num_hidden_layers=3, num_kv_shared_layers=1, intermediate_size=[128] * 3,
                         vocab_size_per_layer_input=128, hidden_size_per_layer_input=16),
    # moe_layers lists layer indices, not one value per layer; chunks of 8 so that the matrix's inputs cross them
    "llama4_text": dict(num_hidden_layers=2, moe_layers=[1], no_rope_layers=[1, 0],
                        layer_types=["chunked_attention", "full_attention"], attention_chunk_size=8),
}
_FAMILY_SIZES["llama4"] = _FAMILY_SIZES["llama4_text"]  # its text decoder (the causal LM of the pair)
# A tower beside the text model (vision, audio) only has to exist: one narrow layer.
_TOWER_SIZES: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
    depth=1, num_layers=1,
)


def _shrunk(defaults: dict[str, Any], sizes: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    """The values of ``sizes`` for the keys ``defaults`` has, directly or through the config class's
    ``attribute_map`` (``aliases``: hidden_size -> n_embd); never new keys (some are read-only properties)."""
    out = {aliases.get(k, k): v for k, v in sizes.items() if aliases.get(k, k) in defaults}
    if "qk_rope_head_dim" in defaults:
        out.pop("head_dim", None)  # MLA: the head dims are the qk_* / v_head_dim keys
    return out


def _per_layer_sample(defaults: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Per-layer lists (``layer_types``, ``no_rope_layers``, ...) cut to one layer of each distinct value.

    A 2-layer sample of a 6-layer pattern would otherwise keep only its first kind (five sliding
    layers, then one full): the tiny model must have every kind of layer of the real one.
    """
    out = {}
    for key, value in defaults.items():
        if isinstance(value, list) and len(value) == num_layers and num_layers > 1:
            hashable = [str(v) for v in value]
            firsts = sorted({hashable.index(v) for v in hashable})
            out[key] = [value[i] for i in firsts]
    return out


def tiny_config(model_type: str, **overrides: Any):
    """A small config of ``model_type``: hidden 64, 2 layers (one more per further kind of layer), 4 heads,
    2 KV heads, head_dim 16, vocab 128, 64 trained positions, MoE/MLA keys shrunk; towers beside the
    text model (vision, audio) one narrow layer. ``overrides`` go to the text config last."""
    from transformers import CONFIG_MAPPING

    overrides = {**_FAMILY_SIZES.get(model_type, {}), **overrides}
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()
    text_key = next((k for k in ("text_config", "language_config", "llm_config") if isinstance(defaults.get(k), dict)),
                    None)
    text_defaults = defaults[text_key] if text_key else defaults
    text_class = CONFIG_MAPPING[text_defaults["model_type"]] if text_key else config_class
    kwargs = _shrunk(text_defaults, {**_SIZES, **_EXTRA_SIZES}, text_class.attribute_map)
    default_layers = text_defaults.get("num_hidden_layers")
    if isinstance(default_layers, int):
        sample = _per_layer_sample(text_defaults, default_layers)
        num_layers = max([2] + [len(v) for v in sample.values()])
        kwargs.update({key: value + value[-1:] * (num_layers - len(value)) for key, value in sample.items()})
        kwargs["num_hidden_layers"] = num_layers
    if model_type == "gpt_neox":
        kwargs.update(use_parallel_residual=True)
    kwargs.update(overrides)
    if "num_hidden_layers" in overrides:  # the per-layer lists follow a layer count given by the caller
        count = overrides["num_hidden_layers"]
        for key in set(sample if isinstance(default_layers, int) else ()) - set(overrides):
            kwargs[key] = [kwargs[key][i % len(kwargs[key])] for i in range(count)]
    if text_key is None:
        return AutoConfig.for_model(model_type, **kwargs)
    towers = {key: {**value, **_shrunk(value, _TOWER_SIZES, CONFIG_MAPPING[value["model_type"]].attribute_map)}
              for key, value in defaults.items()
              if isinstance(value, dict) and value.get("model_type") in CONFIG_MAPPING and key != text_key}
    top = _shrunk(defaults, {k: v for k, v in _SIZES.items() if k.endswith("token_id")}, config_class.attribute_map)
    return AutoConfig.for_model(model_type, **top, **towers, **{text_key: {**text_defaults, **kwargs}})


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
