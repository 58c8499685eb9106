"""Tiny random models of every supported family, built from configs (no downloads).

Used by the tests, the benchmarks and the demo; ``cpu_name`` labels the benchmarks' tables.
"""

from __future__ import annotations

import copy
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


# The rope of long-context checkpoints people load, as their config.json declares it, on tiny models
# (head_dim 16: the LongRoPE lists have 8 values, 6 with Phi-4-mini's partial rotary, shaped like Phi-3.5's:
# short factors near 1, long factors rising to about 60).
_PHI_SHORT = [1.0, 1.01, 1.02, 1.02, 1.04, 1.05, 1.05, 1.06]
_PHI_LONG = [1.08, 1.12, 1.5, 3.1, 8.4, 19.0, 38.0, 60.0]
_LLAMA3 = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192,
               rope_theta=500000.0)
LONG_CONTEXT_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2 (llama3 x32)": ("llama", dict(rope_parameters=dict(_LLAMA3, factor=32.0), max_position_embeddings=131072)),
    "llama-3.1 (llama3 x8)": ("llama", dict(rope_parameters=dict(_LLAMA3, factor=8.0), max_position_embeddings=131072)),
    "gemma-3-4b (linear x8, global layers)": ("gemma3", dict(
        rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1_000_000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)},
        max_position_embeddings=131072, sliding_window=8)),
    "gpt-oss (yarn x32)": ("gpt_oss", dict(
        rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                             original_max_position_embeddings=4096, rope_theta=150000.0),
        max_position_embeddings=131072)),
    "qwen2.5 (yarn x4)": ("qwen2", dict(
        rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768, rope_theta=1e6),
        max_position_embeddings=131072)),
    "phi-3.5-mini (longrope)": ("phi3", dict(
        rope_parameters=dict(rope_type="longrope", short_factor=_PHI_SHORT, long_factor=_PHI_LONG,
                             original_max_position_embeddings=4096, rope_theta=10000.0),
        max_position_embeddings=131072, original_max_position_embeddings=4096)),
    "phi-4-mini (longrope, partial rotary 0.75)": ("phi3", dict(
        rope_parameters=dict(rope_type="longrope", short_factor=_PHI_SHORT[:6], long_factor=_PHI_LONG[:6],
                             original_max_position_embeddings=4096, rope_theta=10000.0, partial_rotary_factor=0.75),
        partial_rotary_factor=0.75, max_position_embeddings=131072, original_max_position_embeddings=4096)),
}


def long_context_config(name: str, **overrides: Any):
    """The tiny config of one of :data:`LONG_CONTEXT_CONFIGS` (real rope parameters, tiny widths)."""
    import copy

    model_type, values = LONG_CONTEXT_CONFIGS[name]
    return tiny_config(model_type, **{**copy.deepcopy(values), **overrides})


def long_context_model(name: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A random tiny model of one of :data:`LONG_CONTEXT_CONFIGS`, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(long_context_config(name, **overrides))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1 and torch.all(param == 0):
                param.normal_(0.0, 0.02)
    return model.eval()


def _transformers_rotation(config, layer_type: str | None, length: int,
                           rotary_class: type | None = None) -> tuple[list[float], float]:
    """transformers' own frequencies and attention factor of the config's rope at ``length`` tokens: from a
    rotary module of ``rotary_class`` built from the config where given (a model may read its own keys, as
    Gemma 4's global layers read ``global_head_dim``), else from transformers' rope functions."""
    import math

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
    kind = params.get("rope_type", "default")
    if rotary_class is not None:
        rotary = rotary_class(config=copy.deepcopy(config))
        prefix = "" if layer_type is None else f"{layer_type}_"
        with torch.no_grad():
            rotary(torch.zeros(1, 1, 1), torch.tensor([[0, length - 1]]),
                   **({} if layer_type is None else {"layer_type": layer_type}))
        inv_freq = getattr(rotary, f"{prefix}inv_freq")
        return [float(v) for v in inv_freq.double()], float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
    if kind == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        return [params["rope_theta"] ** (-i / dim) for i in range(0, dim, 2)], 1.0
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    inv_freq, attention = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=length, **kwargs)
    assert all(math.isfinite(v) for v in inv_freq.tolist())
    return [float(v) for v in inv_freq.double()], float(attention)


def reference_stacked_rotation(config, section: dict, length: int, layer_type: str | None = None,
                               rotary_class: type | None = None) -> tuple[list[float], float]:
    """The frequencies and attention factor that ``section`` stacked on ``config``'s shipped rope gives at a
    sequence of ``length`` tokens, computed frequency by frequency from the rule in docs/positions.md ("RoPE on
    checkpoints that are already scaled"), on transformers' own shipped frequencies (those of ``rotary_class``,
    the model's unpatched rotary class, where given): the tests' oracle."""
    import math

    params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
    context = config.max_position_embeddings
    factor = section.get("factor") or section["target_context"] / context
    kind = section["type"]
    switch = params.get("original_max_position_embeddings") if params.get("rope_type") == "longrope" else None
    # the shipped rotation in the regime this length falls in after stacking (the switch moves by the factor)
    shipped_length = length if switch is None or kind in ("dynamic", "longrope") else (
        switch + 1 if length > switch * factor else 1)
    current, attention = _transformers_rotation(config, layer_type, shipped_length, rotary_class)
    at_context, _ = _transformers_rotation(config, layer_type, context, rotary_class)
    n = sum(1 for w in current if w != 0)

    def ntk(f):
        return [w / f ** (2 * i / (2 * n - 2)) if w else 0.0 for i, w in enumerate(current)]

    if kind == "linear":
        return [w / factor for w in current], attention
    if kind == "ntk":
        return ntk(factor), attention
    if kind == "dynamic":
        return (ntk(factor * length / context - (factor - 1)) if length > context else current), attention
    if kind == "yarn":
        fast, slow = section.get("beta_fast", 32.0), section.get("beta_slow", 1.0)
        out = []
        for w, w_context in zip(current, at_context):
            rotations = context * w_context / (2 * math.pi)
            ramp = 0.0 if rotations <= 0 else min(1.0, max(0.0, (math.log(rotations) - math.log(slow))
                                                         / (math.log(fast) - math.log(slow))))
            out.append(w * (ramp + (1 - ramp) / factor) if w_context else w / factor)
        return out, attention * (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    if kind == "llama3":
        low, high = section.get("low_freq_factor", 1.0), section.get("high_freq_factor", 4.0)
        out = []
        for w, w_context in zip(current, at_context):
            wavelength = 2 * math.pi / w_context if w_context else math.inf
            if wavelength < context / high:
                scale = 1.0
            elif wavelength > context / low:
                scale = 1 / factor
            else:
                smooth = (context / wavelength - low) / (high - low)
                scale = (1 - smooth) / factor + smooth
            out.append(w * scale)
        return out, attention
    if kind == "longrope":
        lists = section["long_factor"] if length > context else section["short_factor"]
        extra = section.get("attention_factor") or math.sqrt(1 + math.log(factor) / math.log(context))
        return [w / s for w, s in zip(current, lists)], attention * extra
    raise ValueError(kind)
