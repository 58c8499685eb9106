"""The ``loss`` section on native MoE models: the chunked loss plus exactly the router losses that the model's
own forward adds (its load-balancing loss, coefficient and attention mask), in train mode, with padding.

Oracle: the unpatched model, i.e. transformers' own forward of each family.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tokens
from transformers import LlamaForCausalLM

import hf_longctx as hl
from hf_longctx.testing import tiny_model

# Each family adds its router loss its own way: Mixtral's load_balancing_loss_func with router_aux_loss_coef,
# JetMoE's own function with aux_loss_coef, Qwen2-MoE's with a shared expert; GLM-4-MoE adds none.
CASES = [
    ("mixtral", {"router_aux_loss_coef": 0.5}),
    ("jetmoe", {"aux_loss_coef": 0.5}),
    ("qwen2_moe", {"router_aux_loss_coef": 0.5}),
    ("glm4_moe", {}),
    ("mixtral", {"router_aux_loss_coef": 0.0}),
]


def _batch():
    ids = tokens(2, 20, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding: the load-balancing loss counts only the real tokens
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _run(model, routers, **kwargs):
    ids, mask, labels = _batch()
    out = model(ids, attention_mask=mask, labels=labels, output_router_logits=routers, **kwargs)
    parameters = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, parameters, allow_unused=True)


@pytest.mark.parametrize("routers", [True, False], ids=["router_logits", "no_router_logits"])
@pytest.mark.parametrize("model_type, config", CASES, ids=[f"{t}-{c}" for t, c in CASES])
def test_loss_aux_loss_and_gradients_equal_the_models_own(model_type, config, routers):
    model = tiny_model(model_type, **config).train()
    expected, expected_grads = _run(model, routers, num_items_in_batch=11)
    if routers and config.get("router_aux_loss_coef", config.get("aux_loss_coef")):  # the router loss shows
        assert expected.aux_loss is not None
        assert abs(expected.loss - _run(model, False, num_items_in_batch=11)[0].loss) > 1e-3
    hl.patch(model, {"loss": {"chunk_size": 7}})
    _assert_same(model, _run(model, routers, num_items_in_batch=11), (expected, expected_grads))


@pytest.mark.parametrize("routers, coefficients", [(True, (0.5, 0.1)), (True, (0.0, 0.0)), (False, (0.5, 0.1))],
                         ids=["router_losses", "coefficients_0", "no_router_logits"])
def test_upcycled_moe_with_loss_equals_the_upcycled_model(routers, coefficients):
    """``moe`` + ``loss``: the router losses of the upcycled model (load balancing and z-loss, padding masked)."""
    model = tiny_model("llama").train()
    aux, z = coefficients
    hl.patch(model, {"moe": {"num_experts": 4, "top_k": 2, "router_aux_loss_coef": aux, "router_z_loss_coef": z}})
    expected = _run(model, routers)
    hl.patch(model, {"loss": {"chunk_size": 7}})
    out = _run(model, routers)
    _assert_same(model, out, expected)
    if routers:
        torch.testing.assert_close(out[0].router_z_loss, expected[0].router_z_loss, rtol=1e-5, atol=0)


def _assert_same(model, ours, theirs):
    """Loss, aux_loss, router logits and every gradient of a patched model equal the unpatched ones."""
    (out, grads), (expected, expected_grads) = ours, theirs
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=0)
    assert (out.get("aux_loss") is None) == (expected.get("aux_loss") is None)
    if expected.get("aux_loss") is not None:
        torch.testing.assert_close(out.aux_loss, expected.aux_loss, rtol=1e-5, atol=0)
    assert (out.get("router_logits") is None) == (expected.get("router_logits") is None)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [g is None for g in grads] == [g is None for g in expected_grads]
    for name, got, want in zip(names, grads, expected_grads):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_return_dict_false_and_calls_without_labels_are_the_models_own():
    model = tiny_model("mixtral", router_aux_loss_coef=0.5)
    ids, mask, labels = _batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        logits = model(ids, attention_mask=mask).logits
        hl.patch(model, {"loss": {"chunk_size": 5}})
        loss, aux_loss, *_ = model(ids, attention_mask=mask, labels=labels, output_router_logits=True,
                                   return_dict=False)
        assert torch.equal(model(ids, attention_mask=mask).logits, logits)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(aux_loss, expected.aux_loss, rtol=1e-5, atol=0)


class _HeadTwice(LlamaForCausalLM):
    """A forward that runs its head twice (a draft pass, then the scored one)."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        super().forward(input_ids=input_ids, **kwargs)
        return super().forward(input_ids=input_ids, labels=labels, **kwargs)


def test_a_forward_that_calls_its_head_twice_is_refused():
    model = _HeadTwice(tiny_model("llama").config).eval()
    with pytest.raises(hl.SpecError, match="calls its output head 2 times"):
        hl.patch(model, {"loss": {}})
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head)
