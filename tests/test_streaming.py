"""SinkCache and the streaming patch against transformers' own models as oracles.

Oracles: DynamicCache (no eviction), a fresh forward over the kept tokens (one-layer models),
Mistral's own sliding window (no sinks), and a reference attention written here that rotates
queries and keys at the StreamingLLM cache positions (multi-layer, with sinks).
"""

import copy

import pytest
import torch
from conftest import tokens
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb, rotate_half

import hf_longctx
from hf_longctx import SinkCache, SpecError
from hf_longctx.compat import CACHE, cache_of
from hf_longctx.streaming import SinkCacheLayer
from hf_longctx.evaluation.streaming import kept_indices, streaming_perplexity
from hf_longctx.testing import tiny_config, tiny_model

S, W = 4, 12


def streamed(model, cache, ids, kwarg=CACHE):
    """Feed ``ids`` one token at a time; logits ``[B, N, V]``."""
    with torch.no_grad():
        return torch.cat([model(ids[:, t : t + 1], **{kwarg: cache}).logits for t in range(ids.shape[1])], dim=1)


def fresh(model, ids, sinks, window):
    """Oracle logits ``[B, N, V]``: each step a fresh forward over its kept tokens at positions 0..K-1."""
    with torch.no_grad():
        return torch.cat(
            [model(ids[:, kept_indices(t, sinks, window)]).logits[:, -1:] for t in range(ids.shape[1])], dim=1
        )


def streaming_pair(model_type="llama", patched=True, rope=None, sinks=S, window=W, **overrides):
    """(streaming model, unpatched oracle copy, cache)."""
    model = tiny_model(model_type, **overrides)
    oracle = copy.deepcopy(model)
    if rope is not None:
        hf_longctx.patch(model, {"rope": rope})
        hf_longctx.patch(oracle, {"rope": rope})
    if patched:
        hf_longctx.patch(model, {"streaming": {"sink_tokens": sinks, "window": window}})
        return model, oracle, SinkCache(sinks, window)
    return model, oracle, SinkCache(sinks, window, model=model)


# --- no eviction: identical to DynamicCache -------------------------------------------------------


@pytest.mark.parametrize("patched", [False, True])
def test_no_eviction_is_dynamic_cache(patched):
    model, oracle, cache = streaming_pair(patched=patched, sinks=4, window=60)
    ids = tokens(2, 10)
    kwargs = dict(max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours = model.generate(ids, **{CACHE: cache}, **kwargs)
        ref = oracle.generate(ids, **{CACHE: DynamicCache()}, **kwargs)
    assert torch.equal(ours.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, ref.logits))
    loop_cache = SinkCache(4, 60, model=model)
    assert torch.equal(streamed(model, loop_cache, ref.sequences), streamed(oracle, DynamicCache(), ref.sequences))


# --- one layer: a fresh forward over the kept tokens ---------------------------------------------


@pytest.mark.parametrize("patched", [False, True], ids=["absolute-positions", "cache-positions"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt_neox", "phi3"])
def test_one_layer_equals_fresh_forward(model_type, patched):
    overrides = {"partial_rotary_factor": 0.5} if model_type == "phi3" else {}
    model, oracle, cache = streaming_pair(model_type, patched=patched, num_hidden_layers=1, **overrides)
    ids = tokens(1, S + W + 25)
    torch.testing.assert_close(streamed(model, cache, ids), fresh(oracle, ids, S, W), atol=1e-4, rtol=0)
    assert cache.cached_lengths() == [S + W]


@pytest.mark.parametrize(
    "rope",
    [{"type": "yarn", "factor": 4.0}, {"type": "llama3", "factor": 4.0}, {"type": "dynamic", "factor": 4.0}],
    ids=lambda r: r["type"],
)
def test_scaled_rope_re_rotation(rope):
    # window 80 > 64 trained positions: dynamic NTK really rescales while the cache fills
    model, oracle, cache = streaming_pair(rope=rope, num_hidden_layers=1, window=80)
    ids = tokens(1, S + 80 + 20)
    torch.testing.assert_close(streamed(model, cache, ids), fresh(oracle, ids, S, 80), atol=1e-4, rtol=0)


def test_rotary_module_swapped_after_cache_creation():
    # The rope patch replaces the rotary module; the cache must use the one present at update time.
    model = tiny_model("llama", num_hidden_layers=1)
    hf_longctx.patch(model, {"streaming": {"sink_tokens": S, "window": W}})
    cache = SinkCache(S, W)
    hf_longctx.patch(model, {"rope": {"type": "yarn", "factor": 4.0}})
    oracle = tiny_model("llama", num_hidden_layers=1)
    hf_longctx.patch(oracle, {"rope": {"type": "yarn", "factor": 4.0}})
    ids = tokens(1, S + W + 10)
    torch.testing.assert_close(streamed(model, cache, ids), fresh(oracle, ids, S, W), atol=1e-4, rtol=0)


def test_unbound_cache_says_what_is_missing():
    model = tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match="model=model"):
        streamed(model, SinkCache(S, W), tokens(1, S + W + 2))


# --- no sinks: Mistral's own sliding window --------------------------------------------------------


@pytest.mark.parametrize("patched", [False, True], ids=["absolute-positions", "cache-positions"])
def test_no_sinks_equals_mistral_sliding_window(patched):
    model, _, cache = streaming_pair("mistral", patched=patched, sinks=0, window=W, sliding_window=None)
    windowed = AutoModelForCausalLM.from_config(tiny_config("mistral", sliding_window=W)).eval()
    windowed.load_state_dict(model.state_dict())
    ids = tokens(2, 40)
    with torch.no_grad():
        expected = windowed(ids).logits
    torch.testing.assert_close(streamed(model, cache, ids), expected, atol=1e-4, rtol=0)


def test_beam_search_and_left_padding_equal_mistral_sliding_window():
    model, _, _ = streaming_pair("mistral", sinks=0, window=W, sliding_window=None)
    windowed = AutoModelForCausalLM.from_config(tiny_config("mistral", sliding_window=W)).eval()
    windowed.load_state_dict(model.state_dict())
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=25, pad_token_id=0)
    with torch.no_grad():
        for extra in ({"do_sample": False}, {"num_beams": 3, "do_sample": False}):
            ours = model.generate(ids, **kwargs, **extra)
            assert torch.equal(ours, windowed.generate(ids, **kwargs, **extra)), extra


# --- multi-layer with sinks: a reference attention at the StreamingLLM positions -------------------


def reference_streaming_logits(model, ids, sinks, window):
    """Token by token; each layer keeps every token's un-rotated key and value as computed when the
    token was processed, and attends over the kept tokens with queries and keys rotated at their
    slots 0..K-1 in the cache (sinks first, the current token last). Returns ``[1, N, V]``."""
    inner, config = model.model, model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    past = [([], []) for _ in inner.layers]
    logits = []
    for t in range(ids.shape[1]):
        kept = kept_indices(t, sinks, window)
        hidden = inner.embed_tokens(ids[:, t : t + 1])
        cos, sin = inner.rotary_emb(hidden, torch.arange(len(kept))[None])
        for layer, (keys, values) in zip(inner.layers, past):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(1, 1, -1, head_dim).transpose(1, 2)
            keys.append(attn.k_proj(x).view(1, 1, -1, head_dim).transpose(1, 2))
            values.append(attn.v_proj(x).view(1, 1, -1, head_dim).transpose(1, 2))
            k = torch.cat([keys[i] for i in kept], dim=2)
            v = torch.cat([values[i] for i in kept], dim=2)
            q = q * cos[:, None, -1:] + rotate_half(q) * sin[:, None, -1:]
            k = (k * cos[:, None] + rotate_half(k) * sin[:, None]).repeat_interleave(group, dim=1)
            weights = torch.softmax(q @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1)
            out = (weights @ v.repeat_interleave(group, dim=1)).transpose(1, 2).reshape(1, 1, -1)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits.append(model.lm_head(inner.norm(hidden)))
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_multi_layer_with_sinks_equals_reference_attention(model_type):
    model, oracle, cache = streaming_pair(model_type, num_hidden_layers=3)
    ids = tokens(1, S + W + 20)
    with torch.no_grad():
        expected = reference_streaming_logits(oracle, ids, S, W)
    torch.testing.assert_close(streamed(model, cache, ids), expected, atol=1e-4, rtol=0)
    # an unpatched model with model= (absolute positions) streams the same thing
    plain_cache = SinkCache(S, W, model=oracle)
    torch.testing.assert_close(streamed(oracle, plain_cache, ids, kwarg="past_key_values"), expected, atol=1e-4, rtol=0)


# --- generate: greedy, sampling, long prompts, batches, length bound -------------------------------


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("patched", [False, True], ids=["past_key_values", "patched-default-cache"])
def test_generate_logits_equal_fresh_forward(do_sample, patched):
    model, oracle, cache = streaming_pair(patched=patched, num_hidden_layers=1)
    ids = tokens(1, 6)
    cache_kwargs = {} if patched else {"past_key_values": cache}
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=40, do_sample=do_sample, output_logits=True, return_dict_in_generate=True,
            **cache_kwargs,
        )
    assert isinstance(cache_of(out), SinkCache)
    expected = fresh(oracle, out.sequences[:, :-1], S, W)[:, ids.shape[1] - 1 :]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk", [1, 5])
def test_long_prompt_is_prefilled_in_chunks(chunk):
    model = tiny_model("llama", num_hidden_layers=1)
    oracle = copy.deepcopy(model)
    hf_longctx.patch(model, {"streaming": {"sink_tokens": S, "window": W, "prefill_chunk": chunk}})
    ids = tokens(1, S + W + 23)
    with torch.no_grad():
        logits = model(ids, cache=SinkCache(S, W)).logits
        expected = []
        for t in range(ids.shape[1]):
            # the first S + W tokens go in one pass; then chunks, whose token j sees W - c + j + 1 recent tokens
            start = t if t < S + W else S + W + (t - S - W) // chunk * chunk
            size = 1 if t < S + W else min(chunk, ids.shape[1] - start)
            recent = W if t < S + W else W - size + t - start + 1
            expected.append(oracle(ids[:, kept_indices(t, S, recent)]).logits[:, -1:])
    torch.testing.assert_close(logits, torch.cat(expected, dim=1), atol=1e-4, rtol=0)


def test_batch_left_padding_equals_each_row_alone():
    model, _, _ = streaming_pair(num_hidden_layers=2)
    rows = [tokens(1, 9, seed=3)[0], tokens(1, 5, seed=4)[0]]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, -len(row) :], mask[i, -len(row) :] = row, 1
    kwargs = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kwargs)
        for i, row in enumerate(rows):
            alone = model.generate(row[None], **kwargs)
            assert torch.equal(batched[i, -30:], alone[0, -30:]), i


def test_cache_length_bound_over_150_generated_tokens():
    model, _, cache = streaming_pair(num_hidden_layers=2)
    seen = []
    update = cache.update

    def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = update(key_states, value_states, layer_idx, *args, **kwargs)
        seen.append((keys.shape[-2], key_states.shape[-2]))
        return keys, values

    cache.update = recording_update
    with torch.no_grad():
        model.generate(tokens(1, 8), **{CACHE: cache}, max_new_tokens=150, min_new_tokens=150, do_sample=False)
    assert cache.get_seq_length() == 8 + 149  # the last generated token is never fed back
    assert max(keys - new for keys, new in seen) <= S + W
    assert all(keys <= S + W for keys, _ in seen[-2 * 100 :])
    assert cache.cached_lengths() == [S + W, S + W]


def test_beam_search_with_sinks_reorders_the_cache():
    model, oracle, _ = streaming_pair(num_hidden_layers=1)
    with torch.no_grad():
        out = model.generate(tokens(1, 6), num_beams=3, max_new_tokens=30, do_sample=False)
        # the returned best beam's own logits: stream it again token by token vs the oracle
        torch.testing.assert_close(
            streamed(model, SinkCache(S, W), out), fresh(oracle, out, S, W), atol=1e-4, rtol=0
        )
    assert out.shape[1] == 36


# --- patch: record, save, reload, unpatch, validation ----------------------------------------------


def test_patch_save_reload_unpatch(tmp_path):
    model = tiny_model("llama")
    before = model(tokens(1, 10)).logits
    hf_longctx.patch(model, "streaming-4-1020")
    assert hf_longctx.applied_sections(model) == {"streaming": {}}
    hf_longctx.save_pretrained(model, tmp_path)
    loaded = hf_longctx.from_pretrained(tmp_path)
    assert hf_longctx.applied_sections(loaded) == {"streaming": {}}
    out = loaded.generate(tokens(1, 4), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(cache_of(out), SinkCache)
    hf_longctx.unpatch(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert torch.equal(model(tokens(1, 10)).logits, before)


def test_spec_validation():
    with pytest.raises(SpecError, match="prefill_chunk"):
        hf_longctx.load_spec({"streaming": {"window": 8, "prefill_chunk": 9}})
    with pytest.raises(ValueError, match="window_length"):
        SinkCache(4, 0)


def test_a_native_window_no_wider_than_the_stream_stays_native():
    """Mistral trained with window 16, streaming 4 + 16: every layer keeps its native window (no sinks), so
    generation far past the window equals the native model's, with a cache of at most 16 tokens."""
    native = tiny_model("mistral", sliding_window=16)
    model = copy.deepcopy(native)
    hf_longctx.patch(model, {"streaming": {"sink_tokens": 4, "window": 16}})
    ids = tokens(2, 10)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
        assert torch.equal(out.sequences, native.generate(ids, max_new_tokens=30, do_sample=False))
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, SinkCache) and max(cache.cached_lengths()) <= 16


# --- streaming perplexity ---------------------------------------------------------------------------


def test_streaming_perplexity_matches_oracles():
    model = tiny_model("llama", num_hidden_layers=1)
    ids = tokens(1, 40)[0]
    # a window longer than the stream: the dense model's own loss
    dense = streaming_perplexity(model, ids, sink_tokens=4, window=64, checkpoints=[39])
    with torch.no_grad():
        expected = model(ids[None], labels=ids[None]).loss.exp().item()
    assert dense.points[-1].perplexity == pytest.approx(expected, rel=1e-5)
    # with eviction: each prediction from a fresh forward over the kept tokens
    result = streaming_perplexity(model, ids, sink_tokens=S, window=W, checkpoints=[20, 39])
    with torch.no_grad():
        logits = fresh(model, ids[None, :-1], S, W)
    nll = torch.nn.functional.cross_entropy(logits[0], ids[1:], reduction="none")
    assert result.points[-1].perplexity == pytest.approx(nll.mean().exp().item(), rel=1e-5)
    assert result.points[0].perplexity == pytest.approx(nll[:20].mean().exp().item(), rel=1e-5)
    assert result.points[-1].cache_tokens == S + W


@pytest.mark.parametrize("warmup", [S + W, S + W + 7])  # up to the capacity; past it (the rest goes token by token)
def test_streaming_perplexity_warmup_changes_only_the_speed(warmup):
    model = tiny_model("llama", num_hidden_layers=2)
    ids = tokens(1, 40)[0]
    single = streaming_perplexity(model, ids, sink_tokens=S, window=W, progress=False)
    warmed = streaming_perplexity(model, ids, sink_tokens=S, window=W, warmup=warmup, warmup_chunk=5, progress=False)
    torch.testing.assert_close(torch.tensor(warmed.token_nll), torch.tensor(single.token_nll), rtol=0, atol=1e-5)
    # and a DynamicCache warmed up in chunks: the dense losses of one forward
    dense = streaming_perplexity(model, ids, cache=DynamicCache(), warmup=warmup, warmup_chunk=5, progress=False)
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    torch.testing.assert_close(torch.tensor(dense.token_nll, dtype=torch.float32), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="recompute has none"):
        streaming_perplexity(model, ids, sink_tokens=S, window=W, recompute=True, warmup=warmup, progress=False)


# --- long streams: one-slot re-rotations do not drift -----------------------------------------------


def exact_rotation(keys, positions, inv_freq):
    """Un-rotated ``keys`` ``[B, H, N, D]`` rotated at ``positions`` ``[N]``, in float64 (rotate-half)."""
    angles = positions.double()[:, None] * inv_freq.double()
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    keys = keys.double()
    return keys * cos + rotate_half(keys) * sin


def test_long_stream_re_rotation_stays_as_exact_as_float32_rope():
    # 5000 one-token steps in the cache frame: each window key is shifted by one slot per step, up to
    # W - 1 = 1019 times before it leaves. Its error against the exact rotation at its slot must stay
    # that of transformers' own float32 RoPE computed from scratch at the same slots.
    sinks, window, steps = 4, 1020, 5000
    config = tiny_config("llama", head_dim=32, num_key_value_heads=1)
    rotary = LlamaRotaryEmbedding(config)
    generator = torch.Generator().manual_seed(0)
    raw_keys = torch.randn(1, 1, steps, 32, dtype=torch.float64, generator=generator)
    values = torch.randn(1, 1, steps, 32, generator=generator)
    # a key enters rotated (exactly) at its slot: positions 0..S+W-1, then always the last slot
    slots = torch.arange(steps).clamp(max=sinks + window - 1)
    inserted = exact_rotation(raw_keys, slots, rotary.inv_freq).float()
    layer = SinkCacheLayer(sinks, window)
    for t in range(steps):
        layer.update(inserted[:, :, t : t + 1], values[:, :, t : t + 1], inv_freq=rotary.inv_freq,
                     start_position=layer.kept_length(1))
    kept = kept_indices(steps - 1, sinks, window)
    exact = exact_rotation(raw_keys[:, :, kept], torch.arange(sinks + window), rotary.inv_freq)
    cos, sin = rotary(values, torch.arange(sinks + window)[None])
    transformers_keys, _ = apply_rotary_pos_emb(raw_keys[:, :, kept].float(), values[:, :, kept], cos, sin)

    def error(keys):  # the worst key's relative error
        return ((keys.double() - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()

    assert torch.equal(layer.values, values[:, :, kept])
    assert error(layer.keys) <= 1.25 * error(transformers_keys), (error(layer.keys), error(transformers_keys))
