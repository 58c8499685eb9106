"""patch / unpatch: recording, transactional failure, repeated sections, unsupported models."""

import dataclasses

import pytest
import torch
from conftest import ALL_FAMILIES, assert_same, snapshot, tokens
from transformers import GPT2Config, GPT2LMHeadModel

import hf_longctx as hl
from hf_longctx import patching
from hf_longctx.testing import tiny_model


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
@pytest.mark.parametrize("spec", ["yarn-4x", "ntk-2x", "alibi"])
def test_unpatch_restores_bit_identical_logits(model_type, spec):
    if model_type == "phi3" and spec == "yarn-4x":
        spec = {"rope": {"type": "ntk", "factor": 8.0}}  # phi3 configs hold no yarn
    model = tiny_model(model_type)
    x = tokens(length=100)
    snap = snapshot(model, x)
    rotary = model.base_model.rotary_emb
    assert hl.patch(model, spec) is model
    with torch.no_grad():
        assert not torch.equal(model(x).logits, snap[0])
    assert hl.unpatch(model) is model
    assert model.base_model.rotary_emb is rotary
    assert_same(model, x, snap)
    assert not hasattr(model.config, "hf_longctx")


def test_applied_spec_is_recorded_as_plain_data():
    model = tiny_model("mistral")
    hl.patch(model, "llama3-8x")
    assert model.config.hf_longctx == {"rope": {"type": "llama3", "factor": 8.0}}
    assert hl.applied_sections(model) == model.config.hf_longctx
    assert "hf_longctx" in model.config.to_json_string()


def test_patching_an_applied_section_again_is_an_error_naming_it():
    model = tiny_model("llama")
    hl.patch(model, "yarn-4x")
    x = tokens()
    snap = snapshot(model, x)
    with pytest.raises(hl.SpecError, match="section 'rope' is already applied"):
        hl.patch(model, "ntk-2x")
    assert_same(model, x, snap)


def test_alibi_after_rope_in_a_second_call_is_rejected():
    model = tiny_model("llama")
    hl.patch(model, "yarn-4x")
    with pytest.raises(hl.SpecError, match="'rope' and 'alibi' cannot be combined"):
        hl.patch(model, "alibi")


def test_a_model_whose_structure_is_not_understood_gets_an_error_naming_the_missing_part():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64))
    with pytest.raises(hl.SpecError, match="cannot find the decoder layers of MambaForCausalLM"):
        hl.patch(model, "yarn-4x")


def test_a_model_without_rotary_embedding_is_refused_by_position_patches_only():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(hl.SpecError, match="model_type 'gpt2' has no rotary embedding to patch"):
        hl.patch(model, "yarn-4x")
    hl.patch(model, {"attention": {"sliding_window": 8}})  # its attention calls the AttentionInterface
    assert hl.applied_sections(model) == {"attention": {"sliding_window": 8}}


def test_model_without_rotary_embedding_gets_an_error():
    model = tiny_model("llama")
    model.model.rotary_emb = None
    with pytest.raises(hl.SpecError, match="no rotary embedding to patch: no \\*RotaryEmbedding module"):
        hl.patch(model, "yarn-4x")


def test_a_failure_while_applying_rolls_back_everything(monkeypatch):
    """rope and moe (a forward wrapper) are applied first, then a later section fails: the model must be
    exactly as before, without a call chain left on the instance."""

    def explode(model, section, spec):
        model.config.num_experts = 99  # a half-done change the rollback must undo
        raise RuntimeError("boom")

    monkeypatch.setitem(patching._TECHNIQUES, "streaming",
                        dataclasses.replace(patching._TECHNIQUES["streaming"], apply=explode))
    model = tiny_model("qwen3")
    x = tokens(length=80)
    snap = snapshot(model, x)
    rotary = model.model.rotary_emb
    with pytest.raises(RuntimeError, match="boom"):
        hl.patch(model, {"rope": {"type": "yarn", "factor": 4.0}, "moe": {}, "streaming": {}})
    assert model.model.rotary_emb is rotary
    assert not hasattr(model, patching.STATE_ATTR)
    assert "forward" not in vars(model) and "generate" not in vars(model)
    assert_same(model, x, snap)


def test_unpatch_of_an_unpatched_model_is_an_error():
    with pytest.raises(hl.SpecError, match="has not been patched"):
        hl.unpatch(tiny_model("llama"))


def test_patch_then_unpatch_then_patch_again():
    model = tiny_model("gemma")
    x = tokens(length=100)
    hl.patch(model, "yarn-4x")
    with torch.no_grad():
        first = model(x).logits
    hl.unpatch(model)
    hl.patch(model, "yarn-4x")
    with torch.no_grad():
        assert torch.equal(model(x).logits, first)


@pytest.mark.parametrize("first", [{"attention": {"sliding_window": 96}}, {"rope": {"type": "linear", "factor": 2}}])
def test_unpatch_keeps_the_sub_config_that_a_multimodal_decoder_reads(first):
    """Gemma 3 4B+ (Gemma3ForConditionalGeneration): the language model reads config.text_config; after an
    unpatch, a second patch must still reach it (a restored copy would leave the decoder on the old object)."""
    from transformers import AutoModelForCausalLM

    from hf_longctx.testing import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gemma3")).eval()
    decoder = hl.families.get_family(model).decoder(model)
    x = tokens(length=24)
    hl.patch(model, first)
    hl.unpatch(model)
    assert decoder.config is model.config.text_config
    with torch.no_grad():
        unpatched = model(x).logits
    hl.patch(model, {"attention": {"sliding_window": 4, "sink_tokens": 2}})
    fresh = AutoModelForCausalLM.from_config(tiny_config("gemma3")).eval()
    fresh.load_state_dict(model.state_dict())
    hl.patch(fresh, {"attention": {"sliding_window": 4, "sink_tokens": 2}})
    with torch.no_grad():
        windowed = model(x).logits
        assert torch.equal(windowed, fresh(x).logits)
    assert (windowed - unpatched).abs().max() > 1e-3
