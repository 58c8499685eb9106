"""Sections compose: any order of patch() calls, one call path, unpatch undoes it all, and what a family
does (softcaps, logit scales, native windows, router losses) survives every section.

Oracles: the unpatched model (bit for bit after unpatch); the model's own loss; the native window of
Mistral / Gemma 2; the explicit-mask model of test_attention_backend.py.
"""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
from conftest import tokens
from test_attention_backend import reference_logits
from transformers import LlamaForCausalLM

import hf_longctx as hl
from hf_longctx import patching
from hf_longctx.testing import tiny_model

SECTIONS = {
    "rope": {"type": "yarn", "factor": 4.0},
    "attention": {"sliding_window": 24, "sink_tokens": 2},
    "streaming": {"sink_tokens": 2, "window": 20},
    "moe": {"num_experts": 4, "top_k": 2},
    "loss": {"chunk_size": 16},
}
INSTANCE_ATTRIBUTES = ("forward", "generate", patching.STATE_ATTR)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _assert_no_instance_attributes(model):
    assert not set(INSTANCE_ATTRIBUTES) & set(vars(model))
    assert "forward" not in vars(model.get_output_embeddings())


def _patched_outputs(model, ids):
    """Logits, the training loss and a short generation of a patched model; all must be finite."""
    logits = _logits(model, ids)
    model.train()
    loss = model(ids, labels=ids).loss
    model.eval()
    with torch.no_grad():
        generated = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert generated.shape == (ids.shape[0], 12)
    return logits, loss


def gemma2_with_biting_softcaps(**overrides):
    """A tiny Gemma 2 whose attention scores and logits reach far into both softcaps, with transformers' eager
    attention (the implementation that applies the attention softcap, on every release)."""
    model = tiny_model("gemma2", **overrides)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
        model.model.norm.weight.add_(60.0)
    return model


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_every_ordered_pair_of_sections_gives_one_model_and_unpatches_bit_identically(model_type):
    base = tiny_model(model_type, num_hidden_layers=2)
    ids = tokens(2, 40)
    before = _logits(base, ids)
    for first, second in itertools.permutations(SECTIONS, 2):
        model = copy.deepcopy(base)
        torch.manual_seed(1)  # moe draws its routers: the same draws whatever the order
        hl.patch(model, {first: SECTIONS[first]})
        hl.patch(model, {second: SECTIONS[second]})
        logits, loss = _patched_outputs(model, ids)
        other = copy.deepcopy(base)
        torch.manual_seed(1)
        hl.patch(other, {second: SECTIONS[second], first: SECTIONS[first]})  # one call
        assert torch.equal(_logits(other, ids), logits), (first, second)
        other.train()
        assert torch.equal(other(ids, labels=ids).loss, loss), (first, second)
        hl.unpatch(model)
        assert torch.equal(_logits(model, ids), before), (first, second)
        _assert_no_instance_attributes(model)
        assert model.config.to_dict() == base.config.to_dict()


def test_all_five_sections_in_one_spec_then_unpatch():
    model = tiny_model("llama")
    ids = tokens(2, 40)
    before = _logits(model, ids)
    hl.patch(model, SECTIONS)
    assert list(model.config.hf_longctx) == ["rope", "attention", "loss", "moe", "streaming"]
    _patched_outputs(model, ids)
    hl.unpatch(model)
    assert torch.equal(_logits(model, ids), before)
    _assert_no_instance_attributes(model)


def test_a_users_own_instance_forward_is_kept_and_put_back():
    model = tiny_model("llama")
    ids = tokens(1, 20)
    calls = []
    own = model.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return own(*args, **kwargs)

    model.forward = counting_forward
    hl.patch(model, {"moe": SECTIONS["moe"], "loss": SECTIONS["loss"]})
    _logits(model, ids)
    assert calls == [1]  # the chain wraps the forward the instance had
    hl.unpatch(model)
    assert vars(model)["forward"] is counting_forward


@pytest.mark.parametrize("order", ["moe first", "loss first"])
def test_moe_and_loss_keep_the_router_losses_and_their_gradients(order):
    torch.manual_seed(3)
    model = tiny_model("llama").train()
    hl.patch(model, {"moe": {"num_experts": 4, "top_k": 2, "router_aux_loss_coef": 0.5, "router_z_loss_coef": 0.1,
                             "noise": 0.1}})
    ids = tokens(2, 32)
    expected = model(ids, labels=ids).loss
    expected_grads = dict(zip([n for n, _ in model.named_parameters()],
                              torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)))
    hl.unpatch(model)
    torch.manual_seed(3)
    fresh = tiny_model("llama").train()
    sections = [{"moe": {"num_experts": 4, "top_k": 2, "router_aux_loss_coef": 0.5, "router_z_loss_coef": 0.1,
                         "noise": 0.1}}, {"loss": {"chunk_size": 7}}]
    for section in sections if order == "moe first" else sections[::-1]:
        hl.patch(fresh, section)
    out = fresh(ids, labels=ids)
    assert out.aux_loss is not None and out.router_z_loss is not None
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=0)
    grads = dict(zip([n for n, _ in fresh.named_parameters()],
                     torch.autograd.grad(out.loss, list(fresh.parameters()), allow_unused=True)))
    assert {n for n, g in grads.items() if g is not None} == {n for n, g in expected_grads.items() if g is not None}
    for name, grad in grads.items():
        if grad is not None:
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_attention_window_and_loss_equal_the_windowed_models_own_loss():
    model = tiny_model("llama").train()
    hl.patch(model, {"attention": {"sliding_window": 6, "sink_tokens": 2}})
    ids = tokens(2, 40)
    expected = model(ids, labels=ids).loss
    hl.patch(model, {"loss": {"chunk_size": 9}})
    torch.testing.assert_close(model(ids, labels=ids).loss, expected, rtol=1e-5, atol=0)
    reference = tiny_model("llama").train()
    torch.testing.assert_close(
        expected, torch.nn.functional.cross_entropy(reference_logits(reference, ids, 6, 2)[:, :-1].flatten(0, 1),
                                                    ids[:, 1:].flatten()), rtol=1e-5, atol=0)


def test_copy_upcycled_moe_with_a_wide_streaming_window_generates_the_plain_models_tokens():
    plain = tiny_model("llama")
    model = copy.deepcopy(plain)
    hl.patch(model, {"moe": {"num_experts": 4, "top_k": 2, "init": "copy"}})
    hl.patch(model, {"streaming": {"sink_tokens": 4, "window": 60}})
    ids = tokens(2, 10)
    with torch.no_grad():
        expected = plain.generate(ids, max_new_tokens=30, do_sample=False)
        got = model.generate(ids, max_new_tokens=30, do_sample=False)
    assert torch.equal(got, expected)


# --- families whose heads and attention do more than Llama's -------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "triton", "sdpa", "eager", "flex"])
def test_gemma2_softcaps_survive_a_window_wider_than_the_input(backend):
    native = gemma2_with_biting_softcaps(sliding_window=8)
    ids = tokens(2, 30)
    expected = _logits(native, ids)
    uncapped = copy.deepcopy(native)
    uncapped.config.attn_logit_softcapping = uncapped.config.final_logit_softcapping = None
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert (expected - _logits(uncapped, ids)).abs().max() > 1.0  # both softcaps bite
    model = copy.deepcopy(native)
    hl.patch(model, {"attention": {"backend": backend, "sliding_window": 64, "sink_tokens": 2}})
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_gemma2_attention_softcap_gradients_through_the_kernels(backend):
    """The kernels' softcap backward: the loss and every gradient of the patched model equal the native ones."""
    native = gemma2_with_biting_softcaps(sliding_window=8).train()
    model = copy.deepcopy(native)
    hl.patch(model, {"attention": {"backend": backend, "sliding_window": 64}})
    ids = tokens(2, 24)
    losses = [m(ids, labels=ids).loss for m in (native, model)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for (name, _), got, want in zip(model.named_parameters(), torch.autograd.grad(losses[1], list(model.parameters())),
                                    torch.autograd.grad(losses[0], list(native.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_gemma2_window_narrower_than_its_local_layers_applies_to_every_layer(backend):
    """Native local window 16, patched 6 + 2 sinks: every layer (local and global) sees the explicit mask."""
    model = gemma2_with_biting_softcaps(sliding_window=16)
    reference = copy.deepcopy(model)
    hl.patch(model, {"attention": {"backend": backend, "sliding_window": 6, "sink_tokens": 2}})
    ids = tokens(2, 30)
    with torch.no_grad():
        expected = reference_logits(reference, ids, 6, 2)
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_gemma2_streaming_keeps_the_local_layers_native_window():
    """Local window 6, sinks + window wider than the input: every step equals the native model, while the
    local layers' caches hold no more than their window."""
    native = gemma2_with_biting_softcaps(sliding_window=6)
    model = copy.deepcopy(native)
    hl.patch(model, {"streaming": {"sink_tokens": 2, "window": 40}})
    ids = tokens(1, 30)
    cache = hl.SinkCache(2, 40)
    with torch.no_grad():
        expected = native(ids).logits
        steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])]
        lengths = cache.cached_lengths()
    torch.testing.assert_close(torch.cat(steps, 1), expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    layer_types = native.config.layer_types
    assert all(n <= (6 if kind == "sliding_attention" else 42) for n, kind in zip(lengths, layer_types))
    with torch.no_grad():
        assert torch.equal(model.generate(ids[:, :8], max_new_tokens=20, do_sample=False),
                           native.generate(ids[:, :8], max_new_tokens=20, do_sample=False))


@pytest.mark.parametrize("model_type, head", [("granite", {"logits_scaling": 4.0}), ("cohere", {"logit_scale": 0.25}),
                                              ("gemma2", {"final_logit_softcapping": 5.0})])
def test_loss_section_equals_the_models_own_loss_through_its_head(model_type, head):
    model = tiny_model(model_type, **head).train()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)  # logits far from the identity of every head transform
    ids = tokens(2, 40)
    expected = model(ids, labels=ids).loss
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    hl.patch(model, {"loss": {"chunk_size": 11}})
    out = model(ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=0)
    for (name, _), got, want in zip(model.named_parameters(), torch.autograd.grad(out.loss, list(model.parameters())),
                                    expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


class _DoubledLogits(LlamaForCausalLM):
    """A head that does something the chunked loss does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_a_head_the_chunked_loss_cannot_reproduce_is_refused():
    model = _DoubledLogits(tiny_model("llama").config).eval()
    ids = tokens(1, 20)
    before = _logits(model, ids)
    with pytest.raises(hl.SpecError, match="its head computes logits"):
        hl.patch(model, {"loss": {}})
    assert torch.equal(_logits(model, ids), before) and "forward" not in vars(model)


def test_an_attention_argument_the_function_cannot_honour_is_refused_at_patch_time():
    model = tiny_model("llama")
    for layer in model.model.layers:  # a family whose attention passes one argument more
        layer.self_attn.forward = functools.partial(layer.self_attn.forward, attention_temperature=torch.tensor(2.0))
    with pytest.raises(hl.SpecError, match="does not honour attention_temperature"):
        hl.patch(model, {"attention": {"sliding_window": 8}})
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "hf_longctx")


def test_orders_and_sections_are_unique():
    technique = patching.technique("loss")
    with pytest.raises(ValueError, match="already registered"):
        patching.register_technique(technique)
    import dataclasses

    with pytest.raises(ValueError, match="order 30 of 'other' is taken by 'loss'"):
        patching.register_technique(dataclasses.replace(technique, section="other"))


def test_a_patched_model_refuses_to_be_deep_copied():
    """Its call path belongs to the original: a copy would silently run the original's weights."""
    model = tiny_model("llama")
    hl.patch(model, {"moe": SECTIONS["moe"]})
    with pytest.raises(TypeError, match="cannot be deep-copied"):
        copy.deepcopy(model)
