"""save_pretrained / from_pretrained: native checkpoints for plain transformers, full round trips."""

import json

import pytest
import torch
from conftest import tokens
from test_rope import longrope_factors
from transformers import AutoModelForCausalLM

import hf_longctx as hl
from hf_longctx.testing import tiny_model

LONG = 256

NATIVE_SPECS = [
    ("llama", {"rope": {"type": "linear", "factor": 4.0}}),
    ("llama", {"rope": {"type": "dynamic", "factor": 4.0}}),
    ("llama", {"rope": {"type": "yarn", "factor": 4.0, "beta_fast": 16.0}}),
    ("qwen3", {"rope": {"type": "llama3", "factor": 8.0}}),
    ("mistral", {"rope": {"type": "ntk", "factor": 4.0}}),
    ("gpt_neox", {"rope": {"type": "yarn", "factor": 4.0}}),
    ("phi3", {"rope": {"type": "longrope", "factor": 4.0, "short_factor": longrope_factors("phi3", 1.0),
                       "long_factor": longrope_factors("phi3", 4.0)}}),
]


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("model_type,spec", NATIVE_SPECS, ids=[f"{m}-{s['rope']['type']}" for m, s in NATIVE_SPECS])
def test_native_types_reload_in_plain_transformers(tmp_path, model_type, spec):
    model = tiny_model(model_type, initializer_range=0.2)
    hl.patch(model, spec)
    hl.save_pretrained(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(length=LONG)
    assert torch.equal(logits(plain, x), logits(model, x))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hf_longctx"] == model.config.hf_longctx


@pytest.mark.parametrize("model_type,spec", NATIVE_SPECS + [("llama", "alibi"), ("gpt_neox", "alibi")])
def test_round_trip_through_hf_longctx_from_pretrained(tmp_path, model_type, spec):
    model = tiny_model(model_type, initializer_range=0.2)
    x = tokens(length=LONG)
    unpatched = logits(model, x)
    hl.patch(model, spec)
    hl.save_pretrained(model, tmp_path)
    reloaded = hl.from_pretrained(tmp_path).eval()
    assert reloaded.config.hf_longctx == model.config.hf_longctx
    assert torch.equal(logits(reloaded, x), logits(model, x))
    # the reloaded model knows its original form: unpatch gives the base model back
    hl.unpatch(reloaded)
    assert torch.equal(logits(reloaded, x), unpatched)
    assert reloaded.config.rope_parameters == {**tiny_model(model_type).config.rope_parameters}


def test_saving_does_not_change_the_model(tmp_path):
    model = tiny_model("llama")
    hl.patch(model, "yarn-4x")
    before = model.config.to_dict()
    hl.save_pretrained(model, tmp_path)
    after = model.config.to_dict()
    after.pop("architectures"), before.pop("architectures")  # transformers' save_pretrained fills this in
    assert after == before
    assert not hasattr(model.config, "hf_longctx_base")


def test_unpatched_model_round_trips(tmp_path):
    model = tiny_model("qwen2")
    hl.save_pretrained(model, tmp_path)
    x = tokens()
    assert torch.equal(logits(hl.from_pretrained(tmp_path), x), logits(model, x))


def test_model_card_names_base_model_patches_and_context():
    model = tiny_model("llama")
    model.config._name_or_path = "meta-llama/Llama-3.2-1B"
    hl.patch(model, {"rope": {"type": "yarn", "target_context": 512}})
    card = hl.model_card(model, repo_id="me/llama-yarn")
    assert "base_model: meta-llama/Llama-3.2-1B" in card
    assert "**rope**: `type` = 'yarn', `target_context` = 512" in card
    assert "max_position_embeddings):** 512" in card
    assert 'hf_longctx.from_pretrained("me/llama-yarn")' in card


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "phi3"])
def test_sliding_window_is_native_where_the_config_can_hold_it(tmp_path, model_type):
    model = tiny_model(model_type, initializer_range=0.2, sliding_window=None)
    x = tokens(length=40)
    unpatched = logits(model, x)
    hl.patch(model, {"attention": {"sliding_window": 8}})
    windowed = logits(model, x)
    assert (windowed - unpatched).abs().max() > 1e-2  # the window is really narrower than the input
    hl.save_pretrained(model, tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), x), windowed)
    reloaded = hl.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, x), windowed)
    hl.unpatch(reloaded)
    assert torch.equal(logits(reloaded, x), unpatched)
    assert getattr(model.config, "sliding_window", None) is None  # saving left the patched model alone


def test_window_with_sinks_has_no_native_form(tmp_path):
    model = tiny_model("mistral", sliding_window=None)
    hl.patch(model, {"attention": {"sliding_window": 8, "sink_tokens": 2}})
    hl.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["sliding_window"] is None
    x = tokens(length=40)
    assert torch.equal(logits(hl.from_pretrained(tmp_path), x), logits(model, x))
