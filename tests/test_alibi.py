"""ALiBi: slopes equal BLOOM's; logits equal a hand-written forward; padding, cache, training."""

import math

import pytest
import torch
from conftest import tokens
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

import hf_longctx as hl
from hf_longctx.compat import CACHE, cache_of
from hf_longctx.families import get_family
from hf_longctx.positions import alibi_slopes
from hf_longctx.testing import tiny_model


@pytest.mark.parametrize("num_heads", [4, 6, 8, 12, 32])
def test_slopes_equal_bloom(num_heads):
    # BLOOM's alibi tensor at key position 1 is exactly the slope of each head.
    bloom = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(alibi_slopes(num_heads), bloom, atol=0, rtol=0)


def test_slopes_of_eight_heads_are_the_papers_geometric_sequence():
    assert alibi_slopes(8).tolist() == [2.0 ** -(h + 1) for h in range(8)]


def reference_llama_forward(model, input_ids):
    """Llama without rotation and with the bias -m_h (i - j) on the scaled scores, written out."""
    inner, config = model.model, model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.head_dim
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])  # heads is a power of two
    n = input_ids.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    bias = -slopes[:, None, None] * (i - j)
    bias = bias.masked_fill(j > i, float("-inf"))
    h = inner.embed_tokens(input_ids)
    for layer in inner.layers:
        attn, x = layer.self_attn, layer.input_layernorm(h)
        q = attn.q_proj(x).view(1, n, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
        v = attn.v_proj(x).view(1, n, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, n, heads * head_dim)
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_alibi_equals_hand_written_reference(attn_implementation):
    model = tiny_model("llama", initializer_range=0.2)
    model.set_attn_implementation(attn_implementation)
    x = tokens(length=40)
    hl.patch(model, "alibi")
    assert model.config._attn_implementation == "hf_longctx_alibi"
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference_llama_forward(model, x), atol=1e-4, rtol=0)
    hl.unpatch(model)
    assert model.config._attn_implementation == attn_implementation


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt_neox", "phi3"])
def test_left_padded_batch_equals_unpadded_rows(model_type):
    model = tiny_model(model_type, initializer_range=0.2)
    hl.patch(model, {"alibi": {}})
    short, long = tokens(length=20, seed=2), tokens(length=32, seed=3)
    pad = torch.zeros(1, 12, dtype=torch.long)
    batch = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :12] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(padded[0, 12:], model(short).logits[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(padded[1], model(long).logits[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_cached_generate_equals_full_recompute(model_type):
    model = tiny_model(model_type, initializer_range=0.2)
    hl.patch(model, "alibi")
    prompt = tokens(length=16)
    cached = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=True, pad_token_id=0)
    recomputed = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, recomputed)
    with torch.no_grad():  # the last step's cached logits equal a full forward over the whole sequence
        full = model(cached).logits[:, -1]
        out = model(cached[:, :-1], use_cache=True)
        step = model(cached[:, -1:], **{CACHE: cache_of(out)}).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=0)


def test_training_gradients_reach_every_parameter():
    model = tiny_model("qwen2").train()
    hl.patch(model, "alibi")
    x = tokens(batch=2, length=24)
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_alibi_turns_rotation_off():
    model = tiny_model("llama")
    hl.patch(model, "alibi")
    rotary = model.model.rotary_emb
    cos, sin = rotary(torch.zeros(1, 5, 64), torch.arange(5)[None])
    assert torch.equal(cos, torch.ones_like(cos)) and torch.equal(sin, torch.zeros_like(sin))


def test_models_with_nope_layers_need_to_be_told_which_layers_to_bias():
    model = tiny_model("smollm3", initializer_range=0.2)  # no_rope_layers [1, 0]: layer 1 is NoPE
    assert get_family(model).nope_layers(model) == [1]
    with pytest.raises(hl.SpecError, match=r"NoPE layers \[1\].*alibi.layers"):
        hl.patch(model, "alibi")
    x = tokens(length=24)
    with torch.no_grad():
        hl.patch(model, {"alibi": {"layers": [0]}})
        only_first = model(x).logits
        hl.unpatch(model)
        hl.patch(model, {"alibi": {"layers": "all"}})
        both = model(x).logits
    attention = get_family(model).attention_modules(model)
    assert torch.equal(attention[0].hf_longctx_alibi_slopes, alibi_slopes(4))
    assert torch.equal(attention[1].hf_longctx_alibi_slopes, alibi_slopes(4))
    assert torch.isfinite(both).all() and (both - only_first).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["gemma3_text", "stablelm"])  # per-layer-type rotary; partial rotary
def test_identity_rotation_keeps_every_layout(model_type):
    """The identity rotary is the model's own evaluated at position 0: cos 1 and sin 0 in the rotated
    dimensions, whatever their number and layer type, so attention scores equal unrotated q.k."""
    model = tiny_model(model_type)
    hl.patch(model, "alibi")
    for rotary in get_family(model).rotary_embeddings(model).values():
        kwargs = {"layer_type": "full_attention"} if model_type == "gemma3_text" else {}
        cos, sin = rotary(torch.zeros(1, 5, 64), torch.arange(5)[None], **kwargs)
        assert torch.equal(cos, torch.ones_like(cos)) and torch.equal(sin, torch.zeros_like(sin))
    assert torch.isfinite(model(tokens(length=20)).logits).all()
