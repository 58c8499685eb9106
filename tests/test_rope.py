"""RoPE scaling: patched models equal transformers' native rope types on the same weights."""

import copy

import pytest
import torch
from conftest import ALL_FAMILIES, tokens
from transformers import AutoModelForCausalLM

import hf_longctx as hl
from hf_longctx.testing import tiny_config, tiny_model

TRAINED = 64  # max_position_embeddings of the tiny configs
LONG = 4 * TRAINED  # inputs four times longer than the trained length
INIT = 0.2  # larger than the default 0.02 init, so that rotations move the logits well above the tolerance


def head_and_rotary_dim(model_type):
    config = tiny_config(model_type)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim, int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))


def native_rope(model_type, rope_type, factor):
    """The config a model declaring this rope type natively has, written out by hand."""
    _, rotary = head_and_rotary_dim(model_type)
    partial = tiny_config(model_type).rope_parameters.get("partial_rotary_factor")
    theta = tiny_config(model_type).rope_parameters["rope_theta"]
    params = {"rope_theta": theta}
    if partial is not None:
        params["partial_rotary_factor"] = partial
    max_positions = int(TRAINED * factor)
    if rope_type == "ntk":
        params.update(rope_type="default", rope_theta=theta * factor ** (rotary / (rotary - 2)))
    elif rope_type == "linear":
        params.update(rope_type="linear", factor=factor)
    elif rope_type == "dynamic":
        params.update(rope_type="dynamic", factor=factor)
        max_positions = TRAINED
    elif rope_type == "yarn":
        params.update(rope_type="yarn", factor=factor, original_max_position_embeddings=TRAINED)
    elif rope_type == "llama3":
        params.update(
            rope_type="llama3",
            factor=factor,
            original_max_position_embeddings=TRAINED,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
        )
    elif rope_type == "longrope":
        params.update(
            rope_type="longrope",
            factor=factor,
            original_max_position_embeddings=TRAINED,
            short_factor=longrope_factors(model_type, 1.0),
            long_factor=longrope_factors(model_type, factor),
        )
    return params, max_positions


def longrope_factors(model_type, top):
    _, rotary = head_and_rotary_dim(model_type)
    return [1.0 + (top - 1.0) * i / (rotary // 2 - 1) for i in range(rotary // 2)]


def rope_section(model_type, rope_type, factor):
    section = {"type": rope_type, "factor": factor}
    if rope_type == "longrope":
        section.update(short_factor=longrope_factors(model_type, 1.0), long_factor=longrope_factors(model_type, factor))
    return section


def cases():
    # Phi-3 takes every type in memory (its config class would rewrite yarn as longrope on load);
    # SmolLM3 has a NoPE layer; StableLM and Phi rotate a part of each head.
    for model_type in [*ALL_FAMILIES, "smollm3", "stablelm", "phi"]:
        for rope_type in ["linear", "ntk", "dynamic", "yarn", "llama3", "longrope"]:
            yield model_type, rope_type


def native_twin(model, model_type, rope_type, factor):
    """transformers' model built from a config that holds the scaled rope parameters (set on the config
    object, so that a config class's rewrite on load is not part of the oracle)."""
    params, max_positions = native_rope(model_type, rope_type, factor)
    config = tiny_config(model_type, initializer_range=INIT)
    config.rope_parameters, config.max_position_embeddings = params, max_positions
    if "original_max_position_embeddings" in config.__dict__ and "original_max_position_embeddings" in params:
        # Phi-3 keeps the pre-extension length beside rope_parameters too, and that value wins
        config.original_max_position_embeddings = params["original_max_position_embeddings"]
    twin = AutoModelForCausalLM.from_config(config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("model_type,rope_type", list(cases()))
def test_patched_equals_native_rope_type(model_type, rope_type):
    model = tiny_model(model_type, initializer_range=INIT)
    x = tokens(length=LONG)
    hl.patch(model, {"rope": rope_section(model_type, rope_type, 4.0)})
    twin = native_twin(model, model_type, rope_type, 4.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, twin(x).logits, atol=1e-4, rtol=0)
        # the scaled rotation really changes the output beyond the trained length
        unpatched = native_twin(model, model_type, "ntk", 1.0)
        assert (model(x).logits - unpatched(x).logits).abs().max() > 1e-2


@pytest.mark.parametrize("rope_type", ["linear", "ntk", "dynamic", "yarn", "llama3"])
def test_factor_one_is_bit_identical(rope_type):
    model = tiny_model("llama")
    x = tokens(length=48)
    with torch.no_grad():
        before = model(x).logits
        hl.patch(model, {"rope": {"type": rope_type, "factor": 1.0}})
        assert torch.equal(model(x).logits, before)


def test_target_context_derives_factor_from_trained_length():
    by_factor, by_target = tiny_model("llama"), tiny_model("llama")
    hl.patch(by_factor, {"rope": {"type": "yarn", "factor": 4.0}})
    hl.patch(by_target, {"rope": {"type": "yarn", "target_context": 4 * TRAINED}})
    assert by_target.config.rope_parameters == by_factor.config.rope_parameters
    assert by_target.config.max_position_embeddings == 4 * TRAINED
    x = tokens(length=LONG)
    with torch.no_grad():
        assert torch.equal(by_factor(x).logits, by_target(x).logits)


def test_original_max_position_embeddings_overrides_trained_length():
    model = tiny_model("llama")
    hl.patch(model, {"rope": {"type": "yarn", "target_context": 128, "original_max_position_embeddings": 32}})
    assert model.config.rope_parameters["factor"] == 4.0
    assert model.config.rope_parameters["original_max_position_embeddings"] == 32


def test_dynamic_matches_transformers_within_and_beyond_trained_length():
    model = tiny_model("qwen2")
    hl.patch(model, "dynamic-ntk-4x")
    twin = native_twin(model, "qwen2", "dynamic", 4.0)
    with torch.no_grad():
        for length in (TRAINED // 2, LONG, TRAINED // 2):  # grow, then shrink back (dynamic resets)
            x = tokens(length=length)
            torch.testing.assert_close(model(x).logits, twin(x).logits, atol=1e-4, rtol=0)


def test_phi3_yarn_runs_in_memory_and_is_reapplied_on_load(tmp_path):
    """Phi3Config turns yarn into longrope when it reads a config: the saved config.json keeps the
    original rotation (plain transformers loads the unscaled model) and hf_longctx re-applies yarn."""
    model = tiny_model("phi3", initializer_range=INIT)
    x = tokens(length=LONG)
    with torch.no_grad():
        unpatched = model(x).logits
    hl.patch(model, {"rope": {"type": "yarn", "factor": 4.0}})
    with torch.no_grad():
        patched = model(x).logits
        torch.testing.assert_close(patched, native_twin(model, "phi3", "yarn", 4.0)(x).logits, atol=1e-4, rtol=0)
        hl.save_pretrained(model, tmp_path)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(x).logits, unpatched, atol=1e-5, rtol=0)
        torch.testing.assert_close(hl.from_pretrained(tmp_path)(x).logits, patched, atol=1e-5, rtol=0)


def gemma3_native(model, full_params):
    """Gemma 3 built by transformers from per-layer-type rope_parameters, with the weights of ``model``."""
    params = copy.deepcopy(model.config.rope_parameters)
    params["full_attention"] = full_params
    config = tiny_config("gemma3_text", initializer_range=INIT, rope_parameters=params,
                         max_position_embeddings=4 * TRAINED)
    twin = AutoModelForCausalLM.from_config(config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_gemma3_yarn_scales_the_full_attention_layers_as_the_native_per_type_config(tmp_path):
    model = tiny_model("gemma3_text", initializer_range=INIT)
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    sliding = copy.deepcopy(model.config.rope_parameters["sliding_attention"])
    full = model.config.rope_parameters["full_attention"]
    x = tokens(length=LONG)
    hl.patch(model, {"rope": {"type": "yarn", "factor": 4.0}})
    assert model.config.rope_parameters["sliding_attention"] == sliding
    yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=TRAINED, rope_theta=full["rope_theta"])
    twin = gemma3_native(model, yarn)
    with torch.no_grad():
        patched = model(x).logits
        torch.testing.assert_close(patched, twin(x).logits, atol=1e-4, rtol=0)
        hl.save_pretrained(model, tmp_path)  # Gemma3TextConfig holds per-type rope natively
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(x).logits, patched, atol=1e-5, rtol=0)


def test_rope_layer_types_picks_the_scaled_types():
    model = tiny_model("gemma3_text")
    full = copy.deepcopy(model.config.rope_parameters["full_attention"])
    hl.patch(model, {"rope": {"type": "linear", "factor": 2.0, "layer_types": ["sliding_attention"]}})
    assert model.config.rope_parameters["full_attention"] == full
    assert model.config.rope_parameters["sliding_attention"]["rope_type"] == "linear"
    with pytest.raises(hl.SpecError, match="names 'chunked_attention'"):
        hl.patch(tiny_model("gemma3_text"), {"rope": {"type": "linear", "factor": 2.0, "layer_types": ["chunked_attention"]}})
    with pytest.raises(hl.SpecError, match="one rotation for all its layers"):
        hl.patch(tiny_model("llama"), {"rope": {"type": "linear", "factor": 2.0, "layer_types": ["sliding_attention"]}})


def test_longrope_factor_count_is_checked():
    model = tiny_model("llama")
    with pytest.raises(hl.SpecError, match="short_factor.*needs 8"):
        hl.patch(model, {"rope": {"type": "longrope", "factor": 4.0, "short_factor": [1.0], "long_factor": [1.0]}})
