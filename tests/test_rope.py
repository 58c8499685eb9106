"""RoPE scaling: patched models equal transformers' native rope types on the same weights."""

import pytest
import torch
from conftest import ALL_FAMILIES, tokens
from transformers import AutoModelForCausalLM

import hf_longctx as hl
from hf_longctx.testing import tiny_config, tiny_model

TRAINED = 64  # max_position_embeddings of the tiny configs
LONG = 4 * TRAINED  # inputs four times longer than the trained length
THETA = 10000.0
INIT = 0.2  # larger than the default 0.02 init, so that rotations move the logits well above the tolerance


def head_and_rotary_dim(model_type):
    config = tiny_config(model_type)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim, int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))


def native_rope(model_type, rope_type, factor):
    """The config a model declaring this rope type natively has, written out by hand."""
    _, rotary = head_and_rotary_dim(model_type)
    partial = tiny_config(model_type).rope_parameters.get("partial_rotary_factor")
    params = {"rope_theta": THETA}
    if partial is not None:
        params["partial_rotary_factor"] = partial
    max_positions = int(TRAINED * factor)
    if rope_type == "ntk":
        params.update(rope_type="default", rope_theta=THETA * factor ** (rotary / (rotary - 2)))
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
    for model_type in ALL_FAMILIES:
        types = ["ntk", "longrope"] if model_type == "phi3" else ["linear", "ntk", "dynamic", "yarn", "llama3", "longrope"]
        for rope_type in types:
            yield model_type, rope_type


def native_twin(model, model_type, rope_type, factor):
    params, max_positions = native_rope(model_type, rope_type, factor)
    config = tiny_config(model_type, rope_parameters=params, max_position_embeddings=max_positions, initializer_range=INIT)
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


def test_phi3_rejects_rope_types_its_config_cannot_hold():
    model = tiny_model("phi3")
    with pytest.raises(hl.SpecError, match="phi3.*ntk, longrope"):
        hl.patch(model, {"rope": {"type": "yarn", "factor": 4.0}})


def test_longrope_factor_count_is_checked():
    model = tiny_model("llama")
    with pytest.raises(hl.SpecError, match="short_factor.*needs 8"):
        hl.patch(model, {"rope": {"type": "longrope", "factor": 4.0, "short_factor": [1.0], "long_factor": [1.0]}})
