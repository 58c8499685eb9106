"""Upcycling every dense MLP form: gated, fused gated and plain two-layer, with biases and any activation."""

import pytest
import torch
from conftest import tokens
from transformers import AutoModelForCausalLM

import hf_longctx as hl
from hf_longctx.families import get_family
from hf_longctx.moe import SparseMoeBlock
from hf_longctx.moe.layer import DenseMLP
from hf_longctx.testing import tiny_config


def model(model_type):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config(model_type, initializer_range=0.2)).eval()
    with torch.no_grad():
        for param in m.parameters():
            if param.dim() == 1 and torch.all(param == 0):
                param.normal_(0.0, 0.2)  # zero biases: make them count
    return m


@pytest.mark.parametrize("model_type, kind, has_bias", [
    ("starcoder2", "plain", True),  # c_fc / c_proj, tanh-GELU
    ("phi", "plain", True),  # fc1 / fc2, GELU
    ("nemotron", "plain", False),  # up_proj / down_proj, relu^2
    ("glm", "fused_gated", False),  # gate_up_proj / down_proj
    ("gpt2", "plain", True),  # Conv1D c_fc / c_proj
    ("olmo2", "gated", False),
])
def test_copy_upcycling_keeps_the_logits_for_every_dense_form(model_type, kind, has_bias):
    m = model(model_type)
    mlp = get_family(m).mlp_modules(m)[0]
    dense = DenseMLP.from_module(mlp)
    assert get_family(m).mlp_kind == kind and (dense.in_bias is not None) == has_bias
    x = tokens(length=20)
    with torch.no_grad():
        before = m(x).logits
        hl.patch(m, {"moe": {"num_experts": 4, "top_k": 2, "noise": 0.0}})
        assert all(isinstance(b, SparseMoeBlock) for b in get_family(m).mlp_modules(m))
        torch.testing.assert_close(m(x).logits, before, atol=1e-5, rtol=1e-5)


def test_partition_with_all_experts_equals_the_plain_mlp():
    m = model("starcoder2")
    x = tokens(length=20)
    with torch.no_grad():
        before = m(x).logits
        hl.patch(m, {"moe": {"num_experts": 4, "top_k": 4, "init": "partition"}})
        torch.testing.assert_close(m(x).logits, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral", "gpt_oss"])
def test_a_model_that_is_already_moe_is_refused(model_type):
    m = model(model_type)
    with pytest.raises(hl.SpecError, match="already a mixture of experts"):
        hl.patch(m, {"moe": {"num_experts": 4}})


def test_an_mlp_that_computes_more_than_its_projections_is_refused():
    m = model("bitnet")  # a norm between the activation and down_proj
    with pytest.raises(hl.SpecError, match="computes more than act\\(gate\\) \\* up"):
        hl.patch(m, {"moe": {"num_experts": 4}})


def test_native_export_refuses_clearly_where_no_moe_family_fits(tmp_path, caplog):
    m = model("starcoder2")
    hl.patch(m, {"moe": {"num_experts": 4}})
    with caplog.at_level("INFO", logger="hf_longctx.moe.export"):
        hl.save_pretrained(m, tmp_path)
    assert "no native MoE checkpoint for model_type 'starcoder2'" in caplog.text
    x = tokens(length=20)
    with torch.no_grad():
        torch.testing.assert_close(hl.from_pretrained(tmp_path)(x).logits, m(x).logits, atol=1e-5, rtol=0)
