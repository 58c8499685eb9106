"""Families found from structure: the parts of each model, the exceptions table, clear refusals."""

import pytest
import torch
from conftest import tokens
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_longctx as hl
from hf_longctx.families import FAMILIES, get_family, supported_model_types
from hf_longctx.testing import tiny_config, tiny_model


def test_llama_parts_are_found_by_structure():
    model = tiny_model("llama")
    family = get_family(model)
    assert family.decoder(model) is model.model
    assert family.layers(model) is model.model.layers
    assert family.attention_modules(model) == [layer.self_attn for layer in model.model.layers]
    assert family.mlp_modules(model) == [layer.mlp for layer in model.model.layers]
    assert family.rotary_embedding(model) is model.model.rotary_emb
    assert family.mlp_kind == "gated" and family.moe_model_type == "mixtral"


@pytest.mark.parametrize("model_type, attention, mlp, kind", [
    ("gpt_neox", "attention", "mlp", "plain"),
    ("phi3", "self_attn", "mlp", "fused_gated"),
    ("starcoder2", "self_attn", "mlp", "plain"),
    ("gpt2", "attn", "mlp", "plain"),
])
def test_other_layouts_are_found_the_same_way(model_type, attention, mlp, kind):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    family = get_family(model)
    layer = family.layers(model)[0]
    assert family.attention_modules(model)[0] is getattr(layer, attention)
    assert family.mlp_modules(model)[0] is getattr(layer, mlp)
    assert family.mlp_kind == kind


def test_a_multimodal_model_finds_its_text_decoder():
    model = AutoModelForCausalLM.from_config(tiny_config("gemma3"))
    family = get_family(model)
    assert family.decoder(model) is model.model.language_model
    assert family.rotary_paths == ("rotary_emb",)


def test_family_of_a_config_equals_the_family_of_its_model():
    config = tiny_config("qwen2")
    assert get_family(config) == get_family(AutoModelForCausalLM.from_config(config))


def test_the_exceptions_table_holds_only_what_structure_cannot_tell():
    # native window forms, the native MoE type, NoPE rules the config does not state: nothing about names
    for model_type, traits in FAMILIES.items():
        assert traits.native_sliding_window or traits.moe_model_type or traits.nope_layer, model_type
    assert len(FAMILIES) <= 12
    assert {"gemma3_text", "olmo2", "starcoder2", "smollm3", "deepseek_v3", "gpt_oss"} <= set(supported_model_types())


def test_hybrid_layers_without_attention_are_left_to_their_mixers():
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_next"))  # linear and full attention layers
    family = get_family(model)
    indices = family.attention_layer_indices(model)
    assert 0 < len(indices) < len(family.layers(model))


def test_nope_layers_come_from_the_config_or_the_exceptions_table():
    smollm3 = tiny_model("smollm3")
    assert get_family(smollm3).nope_layers(smollm3) == [1]
    cohere2 = AutoModelForCausalLM.from_config(tiny_config("cohere2"))  # full attention layers do not rotate
    types = cohere2.config.layer_types
    assert get_family(cohere2).nope_layers(cohere2) == [i for i, t in enumerate(types) if t == "full_attention"]


class MyLlamaConfig(LlamaConfig):
    model_type = "my_llama"


class MyLlamaForCausalLM(LlamaForCausalLM):
    config_class = MyLlamaConfig


def test_a_new_family_with_the_usual_structure_needs_no_entry():
    AutoConfig.register("my_llama", MyLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(MyLlamaConfig, MyLlamaForCausalLM, exist_ok=True)
    llama = tiny_model("llama", initializer_range=0.2)
    mine = MyLlamaForCausalLM(MyLlamaConfig(**llama.config.to_dict())).eval()
    mine.load_state_dict(llama.state_dict())
    spec = {"rope": {"type": "yarn", "factor": 4.0}, "attention": {"sliding_window": 8}, "moe": {"num_experts": 4}}
    for model in (llama, mine):
        torch.manual_seed(0)  # the same random routers
        hl.patch(model, spec)
    x = tokens(length=96)
    with torch.no_grad():
        assert torch.equal(mine(x).logits, llama(x).logits)
