"""Streaming on hybrid models (linear attention, SSM) and on multi-head latent attention (MLA).

Oracles: the unpatched model's own generation and its own default cache (a window wider than the stream
evicts nothing), and for MLA under eviction a fresh forward over the kept tokens (one layer).
"""

import copy

import pytest
import torch
from conftest import tokens
from transformers import CONFIG_MAPPING, DynamicCache

import hf_longctx
from hf_longctx import SinkCache, SpecError
from hf_longctx.compat import CACHE
from hf_longctx.evaluation.streaming import kept_indices
from hf_longctx.streaming import SinkCacheLayer
from hf_longctx.streaming.rotation import RotaryLayout
from hf_longctx.streaming.structure import continues_in_chunks, rotary_layouts
from hf_longctx.testing import tiny_model

S, W = 2, 8


def types(*model_types):
    """The model types, each skipped on a transformers release that does not have it."""
    return [pytest.param(*t, marks=pytest.mark.skipif(t[0] not in CONFIG_MAPPING, reason=f"no {t[0]} here"))
            if isinstance(t, tuple) else
            pytest.param(t, marks=pytest.mark.skipif(t not in CONFIG_MAPPING, reason=f"no {t} here"))
            for t in model_types]


def hybrid_model(model_type, **overrides):
    """A tiny model of a hybrid type; skipped where this transformers release gives it a cache of its own
    (OLMo hybrid before 5.2x), which ``streaming`` refuses, or cannot build its own default cache."""
    model = tiny_model(model_type, **overrides)
    if not model._supports_default_dynamic_cache():
        pytest.skip(f"{model_type} keeps a cache of its own in this transformers release")
    try:
        DynamicCache(config=model.config)
    except KeyError as err:  # Nemotron-H's "mlp" layers before 5.2x: transformers' own generate fails
        pytest.skip(f"transformers' own default cache of {model_type} fails in this release ({err!r})")
    try:
        with torch.no_grad():
            model(tokens(1, 3), use_cache=True, **{CACHE: DynamicCache(config=model.config)})
    except RuntimeError as err:  # Inkling before 5.2x: its short convolutions fail on a 3-token prompt
        pytest.skip(f"transformers' own {model_type} fails on a short prompt with its cache in this release ({err})")
    return model


def greedy(model, ids, new_tokens, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("model_type", types("olmo_hybrid", "qwen3_next", "nemotron_h", "deepseek_v3", "deepseek_v2",
                                              "minicpm3", "falcon_h1", "inkling_text"))
def test_window_wider_than_the_stream_generates_the_plain_model_tokens(model_type):
    model = hybrid_model(model_type)
    plain = copy.deepcopy(model)
    hf_longctx.patch(model, {"streaming": {"sink_tokens": 4, "window": 64}})
    ids = tokens(1, 6)
    ours, theirs = greedy(model, ids, 10), greedy(plain, ids, 10)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), atol=1e-5, rtol=0)


def cache_numel(cache) -> int:
    """Elements held by every tensor of the cache: sink layers' buffers, recurrent layers' states."""
    total = 0
    for layer in cache.layers:
        tensors = [getattr(layer, "key_buffer", None), getattr(layer, "value_buffer", None)]
        for states in ("conv_states", "recurrent_states"):
            tensors += list(getattr(layer, states, {}).values())
        total += sum(t.numel() for t in tensors if isinstance(t, torch.Tensor))
    return total


@pytest.mark.parametrize("model_type", types("olmo_hybrid", "qwen3_next", "nemotron_h", "deepseek_v3", "falcon_h1",
                                              "inkling_text"))
def test_narrow_window_generation_of_four_windows_keeps_the_cache_flat(model_type):
    model = hybrid_model(model_type)
    hf_longctx.patch(model, {"streaming": {"sink_tokens": S, "window": W}})
    cache = SinkCache(S, W)
    ids = tokens(1, 3)
    sizes = []
    with torch.no_grad():
        for step in range(4 * W):
            logits = model(ids[:, -1:] if step else ids, **{CACHE: cache}).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
            sizes.append(cache_numel(cache))
    kinds = {type(layer).__name__ for layer in cache.layers}
    if model_type in ("falcon_h1", "inkling_text"):  # keys and the recurrent state in one layer: both kept there
        assert kinds == {"SinkLinearAttentionLayer"}, kinds
        assert all(any(state is not None for state in (*layer.conv_states.values(), *layer.recurrent_states.values()))
                   for layer in cache.layers)
    elif model_type != "deepseek_v3":
        assert "LinearAttentionLayer" in kinds and "SinkCacheLayer" in kinds, kinds  # recurrent state kept
    assert cache.get_seq_length() == ids.shape[1] - 1
    assert cache.cached_lengths() == [S + W] * len(cache.cached_lengths())
    assert len(set(sizes[S + W + 1 :])) == 1, sizes  # full after S + W tokens, then it never grows


def fresh(model, ids, sinks, window):
    with torch.no_grad():
        return torch.cat([model(ids[:, kept_indices(t, sinks, window)]).logits[:, -1:] for t in range(ids.shape[1])],
                         dim=1)


@pytest.mark.parametrize("model_type,interleaved", types(
    ("deepseek_v3", False),  # rotate-half (its rope_interleave permutes before rotating)
    ("deepseek_v2", True),  # its complex rotation pairs adjacent dims
    ("minicpm3", False),
))
def test_mla_eviction_re_rotates_only_the_rotary_part(model_type, interleaved):
    """One MLA layer streamed past its window: each step equals a fresh forward over the kept tokens. The cached
    rotary part is the shared k_pe: cached apart from the latent (newer releases) or after k_nope."""
    model = tiny_model(model_type, num_hidden_layers=1)
    oracle = copy.deepcopy(model)
    hf_longctx.patch(model, {"streaming": {"sink_tokens": S, "window": W}})
    cache = SinkCache(S, W)
    ids = tokens(1, S + W + 12)
    with torch.no_grad():
        streamed = torch.cat([model(ids[:, t : t + 1], **{CACHE: cache}).logits for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(streamed, fresh(oracle, ids, S, W), atol=1e-4, rtol=0)
    (layout,) = [layer.layout for layer in cache.layers]
    config = model.config
    assert layout.interleaved is interleaved
    assert (layout.tensor, layout.start) in (("values", 0), ("keys", config.qk_nope_head_dim)), layout


@pytest.mark.parametrize("model_type,stepwise", types(("olmo_hybrid", False), ("bailing_hybrid", True)))
def test_a_second_input_of_several_tokens_continues_the_recurrent_state(model_type, stepwise):
    """A prompt given in two parts (window wide): the logits of one pass. bailing_hybrid's own forward fails on
    several tokens after a cached prefix, so its second part goes token by token."""
    model = hybrid_model(model_type)
    plain = copy.deepcopy(model)
    hf_longctx.patch(model, {"streaming": {"sink_tokens": 4, "window": 64}})
    assert continues_in_chunks(model) is not stepwise
    ids = tokens(1, 12)
    cache = SinkCache(4, 64)
    with torch.no_grad():
        first = model(ids[:, :5], **{CACHE: cache}).logits
        second = model(ids[:, 5:], **{CACHE: cache}).logits
        expected = plain(ids).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type,reason", types(
    ("hy_v4", "DynamicIndexedLayer"),  # an indexer key cache that grows with the stream
))
def test_cache_layers_a_sink_cache_cannot_hold_are_refused(model_type, reason):
    model = tiny_model(model_type)
    with pytest.raises(SpecError, match=reason):
        hf_longctx.patch(model, {"streaming": {"sink_tokens": S, "window": W}})
    assert "hf_longctx" not in model.config.to_dict()


def test_keys_that_are_no_rotation_by_position_are_refused():
    """A rotary embedding whose angle is not position * inv_freq: no layout reproduces the model's own cache."""
    model = tiny_model("llama", num_hidden_layers=1)
    rotary = model.model.rotary_emb
    forward = rotary.forward
    rotary.forward = lambda x, position_ids: forward(x, position_ids.float() ** 2)
    with pytest.raises(SpecError, match="cannot move its cached keys exactly"):
        hf_longctx.patch(model, {"streaming": {"sink_tokens": S, "window": W}})


def test_nope_layers_are_never_re_rotated():
    """SmolLM3 skips the rotation in some layers: their cached keys stay as the model computed them."""
    model = tiny_model("smollm3", num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0])
    layouts = rotary_layouts(model, SinkCache(S, W, model=model)._inv_freq())
    assert layouts == {0: RotaryLayout(), 1: RotaryLayout(), 2: RotaryLayout(), 3: None}
    cache = SinkCache(S, W, model=model)
    assert [layer.layout for layer in cache.layers if isinstance(layer, SinkCacheLayer)] == [
        RotaryLayout(), RotaryLayout(), RotaryLayout(), None]


@pytest.mark.parametrize("model_type", types("falcon_h1", "inkling_text"))
def test_a_layer_with_keys_and_a_recurrent_state_continues_the_state_over_a_second_input(model_type):
    """Falcon-H1 (Mamba-2 beside attention in every layer): a prompt given in two parts through a sink cache
    wider than it has the logits of one pass, so the state kept beside the keys carries over."""
    model = hybrid_model(model_type)
    plain = copy.deepcopy(model)
    hf_longctx.patch(model, {"streaming": {"sink_tokens": 4, "window": 64}})
    ids = tokens(1, 12)
    cache = SinkCache(4, 64)
    with torch.no_grad():
        first = model(ids[:, :5], **{CACHE: cache}).logits
        second = torch.cat([model(ids[:, t : t + 1], **{CACHE: cache}).logits for t in range(5, 12)], dim=1)
        expected = plain(ids).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), expected, atol=1e-5, rtol=0)
