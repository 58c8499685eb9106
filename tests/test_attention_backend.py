"""The ``attention`` patch against transformers' own attention on tiny random models (float32, CPU).

Oracles: Mistral's native sliding window; the unpatched model fed a hand-made 4-D boolean
mask ``i - W < j <= i or j < S`` (transformers passes a 4-D mask through untouched);
gpt-oss's eager attention for the sink logits; the same documents or rows run alone.
The kernel backends run the blocked CPU path here (``auto`` on the CPU); the Triton
kernels are tested in test_kernels.py.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from conftest import ALL_FAMILIES, tokens
from transformers import AttentionInterface
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

import hf_longctx
from hf_longctx import SpecError
from hf_longctx.attention import SINK_INIT
from hf_longctx.families import get_family
from hf_longctx.testing import tiny_model

W, S = 6, 2  # window and sinks, both far below the test lengths
TORCH_BACKENDS = ["auto", "sdpa", "eager"]  # flex runs forward-only on the CPU: tested under no_grad
ATOL = 2e-5


def explicit_mask(n: int, window: int, sinks: int) -> torch.Tensor:
    """``[1, 1, n, n]`` bool: query i sees key j iff j <= i and (i - window < j or j < sinks)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return ((j <= i) & ((j > i - window) | (j < sinks)))[None, None]


def reference_logits(model, ids, window=W, sinks=S, **kwargs):
    """The unpatched model's own attention with the hand-made mask (additive: eager attention adds it)."""
    visible = explicit_mask(ids.shape[1], window, sinks).expand(ids.shape[0], 1, -1, -1)
    mask = torch.zeros(visible.shape, dtype=model.dtype).masked_fill(~visible, torch.finfo(model.dtype).min)
    return model(ids, attention_mask=mask, use_cache=False, **kwargs).logits


def randomize_sinks(model):
    """Trained-looking sink logits, so that the sinks visibly change the attention."""
    with torch.no_grad():
        for attn in get_family(model).attention_modules(model):
            attn.sinks.copy_(torch.randn(attn.sinks.shape))


def attention_spec(backend="auto", window=W, sinks=S, **extra):
    return {"attention": {"backend": backend, "sliding_window": window, "sink_tokens": sinks, **extra}}


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_mistral_without_window_patched_equals_native_sliding_window(backend):
    patched = tiny_model("mistral", sliding_window=None)
    native = tiny_model("mistral", sliding_window=W)
    native.load_state_dict(patched.state_dict())
    hf_longctx.patch(patched, attention_spec(backend, sinks=0))
    ids = tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, native(ids).logits, atol=ATOL, rtol=0)
        assert torch.equal(patched.generate(ids, max_new_tokens=8, do_sample=False),
                           native.generate(ids, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("family, backend", [(family, "auto") for family in ALL_FAMILIES] + [
    (family, backend) for family in ("llama", "qwen3", "gpt_neox") for backend in ("sdpa", "eager")])
def test_window_and_sinks_equal_explicit_mask_with_gradients(family, backend):
    model = tiny_model(family).train()  # train(): the gradient test runs the training path (dropout is 0)
    oracle = copy.deepcopy(model)
    ids = tokens(2, 24)
    expected = reference_logits(oracle, ids)
    hf_longctx.patch(model, attention_spec(backend))
    got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    got.square().mean().backward()
    expected.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_flex_backend_equals_explicit_mask_and_falls_back_for_gradients():
    model = tiny_model("llama")
    ids = tokens(2, 24)
    with torch.no_grad():
        expected = reference_logits(model, ids)
    hf_longctx.patch(model, attention_spec("flex"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=ATOL, rtol=0)
    logits = model(ids).logits  # flex has no CPU backward: the blocked path runs instead
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    logits.sum().backward()


def _gpt_oss_eager_with_mask(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Oracle: gpt-oss's eager attention (sink logits) with the hand-made window + sink mask."""
    n, m = query.shape[2], key.shape[2]
    allowed = explicit_mask(m, W, S)[..., m - n:, :]
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    view = types.SimpleNamespace(num_key_value_groups=query.shape[1] // key.shape[1], sinks=module.sinks,
                                 training=module.training)
    return gpt_oss_eager(view, query, key, value, bias, scaling=scaling, dropout=dropout)


AttentionInterface.register("test_gpt_oss_eager_window_sinks", _gpt_oss_eager_with_mask)


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_learnable_sinks_identity_at_init_gradients_and_trained_values(backend):
    model = tiny_model("qwen3")
    ids = tokens(2, 24)
    with torch.no_grad():
        before = model(ids).logits
    hf_longctx.patch(model, {"attention": {"backend": backend, "learnable_sinks": True}})
    sinks = [attn.sinks for attn in get_family(model).attention_modules(model)]
    assert all(s.shape == (model.config.num_attention_heads,) and torch.all(s == SINK_INIT) for s in sinks)
    logits = model(ids).logits
    torch.testing.assert_close(logits, before, atol=1e-6, rtol=0)
    logits.square().mean().backward()
    for s in sinks:
        assert s.grad is not None and torch.all(torch.isfinite(s.grad)) and torch.all(s.grad != 0)


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_trained_sink_logits_equal_gpt_oss_eager(backend):
    model = tiny_model("llama")
    hf_longctx.patch(model, attention_spec(backend, learnable_sinks=True))
    randomize_sinks(model)
    ids = tokens(2, 24)
    got = model(ids).logits
    model.set_attn_implementation("test_gpt_oss_eager_window_sinks")  # the same weights and sinks, the oracle's attention
    torch.testing.assert_close(got, model(ids, use_cache=False).logits, atol=ATOL, rtol=0)


def test_trained_sinks_survive_save_and_from_pretrained(tmp_path):
    model = tiny_model("llama")
    hf_longctx.patch(model, attention_spec(learnable_sinks=True))
    randomize_sinks(model)
    ids = tokens(1, 24)
    with torch.no_grad():
        expected = model(ids).logits
    hf_longctx.save_pretrained(model, tmp_path)
    loaded = hf_longctx.from_pretrained(tmp_path)
    for a, b in zip(get_family(model).attention_modules(model), get_family(loaded).attention_modules(loaded)):
        assert torch.equal(a.sinks, b.sinks)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)
    hf_longctx.unpatch(loaded)
    assert not hasattr(get_family(loaded).attention_modules(loaded)[0], "sinks")


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_generate_with_kv_cache_equals_full_recompute(backend):
    model = tiny_model("llama")
    hf_longctx.patch(model, attention_spec(backend, learnable_sinks=True))
    randomize_sinks(model)
    with torch.no_grad():
        ids = tokens(1, 12)
        options = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
        cached = model.generate(ids, use_cache=True, **options)
        recomputed = model.generate(ids, use_cache=False, **options)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_left_padded_batch_equals_rows_alone(backend):
    model = tiny_model("qwen2")
    hf_longctx.patch(model, attention_spec(backend))
    rows = [tokens(1, 20, seed=1)[0], tokens(1, 13, seed=2)[0]]
    ids = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, 20 - len(row):], mask[r, 20 - len(row):] = row, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for r, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(batch[r, 20 - len(row):], alone, atol=ATOL, rtol=0)
            alone_generated = model.generate(row[None], max_new_tokens=6, do_sample=False)
            assert torch.equal(generated[r, 20 - len(row):], alone_generated[0])


@pytest.mark.parametrize("backend, dropout", [(b, 0.0) for b in TORCH_BACKENDS + ["flex"]] + [("auto", 1e-12)])
def test_packed_sequence_equals_documents_alone(backend, dropout):
    # dropout > 0 in train mode takes the torch path (the kernels have no dropout); 1e-12 never drops.
    model = tiny_model("llama", attention_dropout=dropout).train(dropout > 0)
    hf_longctx.patch(model, attention_spec(backend, learnable_sinks=True))
    randomize_sinks(model)
    rows = [[tokens(1, n, seed=n)[0] for n in lengths] for lengths in ((9, 14, 5), (14, 5, 9))]  # two packed rows
    packed = torch.stack([torch.cat(docs) for docs in rows])
    position_ids = torch.stack([torch.cat([torch.arange(len(d)) for d in docs]) for docs in rows])
    with torch.set_grad_enabled(backend != "flex"):
        logits = model(packed, position_ids=position_ids, use_cache=False).logits
        for r, docs in enumerate(rows):
            start = 0
            for doc in docs:
                alone = model(doc[None], use_cache=False).logits[0]
                torch.testing.assert_close(logits[r, start:start + len(doc)], alone, atol=ATOL, rtol=0)
                start += len(doc)
        if backend != "flex":
            logits.sum().backward()
            assert all(p.grad is not None for p in model.parameters())


def _snapshot(model, ids):
    with torch.no_grad():
        return model(ids).logits


SPECS = {
    "window": attention_spec(),
    "learnable_sinks": attention_spec("eager", learnable_sinks=True),
    "alibi+attention": {"alibi": {}, **attention_spec()},
    "yarn+attention": {"rope": {"type": "yarn", "factor": 2.0}, **attention_spec("sdpa")},
}


@pytest.mark.parametrize("spec", list(SPECS))
def test_unpatch_is_bit_identical(spec):
    model = tiny_model("llama")
    ids = tokens(1, 24)
    before, impl = _snapshot(model, ids), model.config._attn_implementation
    hf_longctx.patch(model, SPECS[spec])
    assert not torch.equal(_snapshot(model, ids), before)
    hf_longctx.unpatch(model)
    assert model.config._attn_implementation == impl
    assert torch.equal(_snapshot(model, ids), before)


@pytest.mark.parametrize("order, backend", [("one call", "auto"), ("alibi then attention", "auto"),
                                            ("attention then alibi", "auto"), ("one call", "sdpa"),
                                            ("attention then alibi", "eager")])
def test_alibi_goes_through_the_backend_in_every_order(order, backend):
    model = tiny_model("gpt_neox")
    ids = tokens(2, 24)
    before = _snapshot(model, ids)
    oracle = copy.deepcopy(model)
    hf_longctx.patch(oracle, {"alibi": {}})
    with torch.no_grad():
        expected = reference_logits(oracle, ids)  # ALiBi's own attention with the hand-made mask
    steps = {"one call": [{"alibi": {}, **attention_spec(backend)}],
             "alibi then attention": [{"alibi": {}}, attention_spec(backend)],
             "attention then alibi": [attention_spec(backend), {"alibi": {}}]}[order]
    for step in steps:
        hf_longctx.patch(model, step)
    assert model.config._attn_implementation.startswith("hf_longctx_attn_")
    torch.testing.assert_close(_snapshot(model, ids), expected, atol=ATOL, rtol=0)
    hf_longctx.unpatch(model)
    assert torch.equal(_snapshot(model, ids), before)


def test_rope_yarn_combined_with_window_and_sinks():
    model = tiny_model("llama")
    ids = tokens(2, 40)
    oracle = copy.deepcopy(model)
    hf_longctx.patch(oracle, {"rope": {"type": "yarn", "factor": 2.0}})
    with torch.no_grad():
        expected = reference_logits(oracle, ids)
    hf_longctx.patch(model, {"rope": {"type": "yarn", "factor": 2.0}, **attention_spec()})
    torch.testing.assert_close(_snapshot(model, ids), expected, atol=ATOL, rtol=0)


def test_window_at_least_the_sequence_is_bit_identical_with_sdpa():
    model = tiny_model("llama")
    ids = tokens(1, 24)
    before = _snapshot(model, ids)
    hf_longctx.patch(model, attention_spec("sdpa", window=64, sinks=0))
    torch.testing.assert_close(_snapshot(model, ids), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_a_patched_window_never_widens_the_native_one(backend):
    """Mistral trained with window 16 and patched with window 32 (+ sinks) is still exactly native window 16."""
    native = tiny_model("mistral", sliding_window=16)
    patched = copy.deepcopy(native)
    hf_longctx.patch(patched, attention_spec(backend, window=32, sinks=S))
    assert patched.config.sliding_window == 16
    ids = tokens(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, native(ids).logits, atol=ATOL, rtol=0)
        wider = tiny_model("mistral", sliding_window=32)
        assert not torch.allclose(wider(ids).logits, native(ids).logits, atol=1e-3)  # the widening would show
        assert torch.equal(patched.generate(ids, max_new_tokens=6, do_sample=False),
                           native.generate(ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_a_narrower_window_with_sinks_narrows_a_native_window(backend):
    """Native window 16 patched with W + S sinks: the explicit-mask oracle, and generation with the KV cache
    (the sinks must outlive the native window's cache) equals full recompute."""
    model = tiny_model("mistral", sliding_window=16)
    reference = copy.deepcopy(model)
    hf_longctx.patch(model, attention_spec(backend))
    ids = tokens(2, 30)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_logits(reference, ids), atol=ATOL, rtol=0)
        options = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
        cached = model.generate(ids[:1, :14], use_cache=True, **options)
        recomputed = model.generate(ids[:1, :14], use_cache=False, **options)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_a_window_without_sinks_bounds_every_layers_cache():
    model = tiny_model("llama", num_hidden_layers=3)
    hf_longctx.patch(model, attention_spec(sinks=0))
    with torch.no_grad():
        out = model(tokens(1, 30), use_cache=True)
    cache = out.get("cache", out.get("past_key_values"))
    assert [layer.keys.shape[-2] for layer in cache.layers] == [W - 1] * 3


@pytest.mark.parametrize("section, message", [
    ({"sink_tokens": 4}, "needs 'attention.sliding_window'"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"backend": "cuda"}, "backend"),
])
def test_bad_specs_are_rejected_before_touching_the_model(section, message):
    model = tiny_model("llama")
    with pytest.raises(SpecError, match=message):
        hf_longctx.patch(model, {"attention": section})
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "hf_longctx")


def test_presets():
    assert {"window-4k", "window-sinks"} <= set(hf_longctx.list_presets())
    window = hf_longctx.load_spec("window-4k").sections()["attention"]
    sinks = hf_longctx.load_spec("window-sinks").sections()["attention"]
    assert window.sliding_window == 4096 and window.sink_tokens == 0
    assert sinks.sliding_window == 4096 and sinks.sink_tokens == 4
