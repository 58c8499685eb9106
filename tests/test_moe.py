"""MoE upcycling: function preservation, transformers' Mixtral block and native MoE models as oracles,
router losses and training, native export, validation and unpatch."""

import copy
import json

import pytest
import torch
from conftest import ALL_FAMILIES, tokens
from transformers import AutoModelForCausalLM

import hf_longctx as hl
from hf_longctx.families import get_family
from hf_longctx.moe.dispatch import resolve_backend, route
from hf_longctx.moe.layer import SparseMoeBlock
from hf_longctx.testing import mixtral_block, tiny_model

TRAINED = 64  # max_position_embeddings of the tiny configs
INIT = 0.2  # larger than the default 0.02, so that the MLPs move the logits far above the tolerances
# Qwen2-MoE's zero-width shared expert: transformers warns when it initialises it on load.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
NATIVE = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}


def model(model_type, **overrides):
    return tiny_model(model_type, initializer_range=INIT, **overrides)


def logits(m, ids, **kwargs):
    with torch.no_grad():
        return m(ids, **kwargs).logits


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_copy_init_gives_the_dense_logits(model_type):
    m = model(model_type)
    ids = tokens(2, 40)
    dense = logits(m, ids)
    hl.upcycle_moe(m, num_experts=4, top_k=2, init="copy")
    assert all(isinstance(mlp, SparseMoeBlock) for mlp in get_family(m).mlp_modules(m))
    torch.testing.assert_close(logits(m, ids), dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_partition_with_all_experts_gives_the_dense_logits(model_type):
    m = model(model_type)
    ids = tokens(2, 40)
    dense = logits(m, ids)
    hl.patch(m, {"moe": {"num_experts": 4, "top_k": 4, "init": "partition"}})
    experts = get_family(m).mlp_modules(m)[0].experts
    assert experts.down_proj.shape[-1] == m.config.intermediate_size // 4  # each expert a quarter of the neurons
    torch.testing.assert_close(logits(m, ids), dense, atol=1e-5, rtol=0)
    # The tolerance means something: with 2 of the 4 partitions per token the model is another one.
    sparse = model(model_type)
    hl.patch(sparse, {"moe": {"num_experts": 4, "top_k": 2, "init": "partition"}})
    assert (logits(sparse, ids) - dense).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "bmm"])
@pytest.mark.parametrize("num_tokens", [3, 257])  # 3 tokens x top-2 leave most of the 8 experts empty
def test_block_matches_mixtral_block_forward_and_backward(backend, num_tokens):
    llama = model("llama")
    dense = get_family(llama).mlp_modules(llama)[0]
    block = SparseMoeBlock.from_dense(dense, "gated", num_experts=8, top_k=2, noise=0.3)
    block.experts.backend = backend
    twin = mixtral_block(block)  # transformers' eager loop over experts: the plainest reference
    x = torch.randn(1, num_tokens, 64)
    grad = torch.randn_like(x)
    outputs, grads = [], []
    for module in (block, twin):
        inp = x.clone().requires_grad_()
        out = module(inp)
        out.backward(grad)
        outputs.append(out)
        grads.append([inp.grad, module.gate.weight.grad, module.experts.gate_up_proj.grad, module.experts.down_proj.grad])
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def family_expert_mlps(dense, kind, experts):
    """One copy of the family's own transformers MLP class per expert, holding that expert's weights.

    Returns (the MLPs, for each a list of (MLP parameter, the expert parameter, its slice))."""
    mlps, pairs = [], []
    for e in range(experts.num_experts):
        mlp = copy.deepcopy(dense)
        if kind == "plain":
            links = [
                (mlp.dense_h_to_4h.weight, experts.up_proj, e),
                (mlp.dense_h_to_4h.bias, experts.up_proj_bias, e),
                (mlp.dense_4h_to_h.weight, experts.down_proj, e),
                (mlp.dense_4h_to_h.bias, experts.down_proj_bias, e),
            ]
        elif kind == "fused_gated":
            links = [(mlp.gate_up_proj.weight, experts.gate_up_proj, e), (mlp.down_proj.weight, experts.down_proj, e)]
        else:
            size = mlp.intermediate_size
            links = [
                (mlp.gate_proj.weight, experts.gate_up_proj, (e, slice(0, size))),
                (mlp.up_proj.weight, experts.gate_up_proj, (e, slice(size, 2 * size))),
                (mlp.down_proj.weight, experts.down_proj, e),
            ]
        with torch.no_grad():
            for target, source, index in links:
                target.copy_(source[index])
        mlps.append(mlp)
        pairs.append(links)
    return mlps, pairs


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "bmm"])
@pytest.mark.parametrize("model_type", ["gpt_neox", "phi3", "gemma", "qwen2"])
def test_distinct_experts_match_the_family_mlp_weighted_by_the_router(model_type, backend):
    """Each expert is the family's own transformers MLP class holding that expert's weights: the
    output and every gradient (input, router, each expert weight and bias) match autograd through them.
    GPT-NeoX: GELU with biases; Phi-3: fused gate/up; Gemma: tanh-GELU gated; Qwen2: SwiGLU."""
    m = model(model_type)
    family = get_family(m)
    dense = family.mlp_modules(m)[0]
    num_experts = 6  # 29 tokens x top-2: some experts may get no rows, their gradients must be zero
    block = SparseMoeBlock.from_dense(dense, family.mlp_kind, num_experts=num_experts, top_k=2, noise=0.3)
    block.experts.backend = backend
    mlps, pairs = family_expert_mlps(dense, family.mlp_kind, block.experts)
    router = block.gate.weight.detach().clone().requires_grad_()
    x = torch.randn(29, 64)
    grad = torch.randn_like(x)

    ref_x = x.clone().requires_grad_()
    weights, indices = route(ref_x @ router.t(), 2)
    expected = sum((weights * (indices == e)).sum(-1, keepdim=True) * mlp(ref_x) for e, mlp in enumerate(mlps))
    expected.backward(grad)
    # The router gradient sums over every token and expert (values up to ~60 here): its float32 rounding is
    # judged against float64, as the kernels' are: at most twice the error of the float32 autograd reference.
    router64 = router.detach().double().requires_grad_()
    x64 = x.double()
    weights64, indices64 = route(x64 @ router64.t(), 2)
    assert torch.equal(indices64, indices)
    mlps64 = [copy.deepcopy(mlp).double() for mlp in mlps]
    sum((weights64 * (indices64 == e)).sum(-1, keepdim=True) * mlp(x64) for e, mlp in enumerate(mlps64)).backward(
        grad.double())

    inp = x.clone().requires_grad_()
    out = block(inp[None])[0]
    out.backward(grad)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inp.grad, ref_x.grad, atol=1e-5, rtol=1e-5)
    reference_error = (router.grad.double() - router64.grad).abs().max()
    assert (block.gate.weight.grad.double() - router64.grad).abs().max() <= 2 * reference_error + 1e-6
    for links in pairs:
        for target, source, index in links:
            torch.testing.assert_close(source.grad[index], target.grad, atol=1e-5, rtol=1e-5)
    # Every expert's weights receive a gradient only from its own tokens.
    used = set(indices.flatten().tolist())
    for e in range(num_experts):
        assert (block.experts.down_proj.grad[e].abs().max() > 0) == (e in used)


def test_loop_backend_with_frozen_experts_gives_input_and_router_gradients_only():
    """LoRA-style training freezes the experts: no expert gradient is made, the rest is unchanged."""
    llama = model("llama")
    block = SparseMoeBlock.from_dense(get_family(llama).mlp_modules(llama)[0], "gated", 4, 2, noise=0.3)
    x = torch.randn(1, 50, 64)
    grad = torch.randn_like(x)
    grads = {}
    for backend in ("bmm", "loop"):
        block.experts.backend = backend
        block.experts.requires_grad_(False)
        block.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_()
        block(inp).backward(grad)
        assert block.experts.gate_up_proj.grad is None and block.experts.down_proj.grad is None
        grads[backend] = (inp.grad, block.gate.weight.grad)
    for ours, reference in zip(grads["loop"], grads["bmm"]):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_backend_choice_and_autocast():
    x, weight = torch.randn(4, 8), torch.randn(2, 16, 8)
    assert resolve_backend("auto", x, weight) == "loop"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_backend("auto", x, weight) in ("grouped_mm", "bmm")
    with pytest.raises(ValueError, match="unknown MoE backend 'fast'"):
        resolve_backend("fast", x, weight)
    # Under autocast the block runs (matmuls in bf16) and returns the input's dtype, close to float32.
    llama = model("llama")
    block = SparseMoeBlock.from_dense(get_family(llama).mlp_modules(llama)[0], "gated", 4, 2, noise=0.3)
    inp = torch.randn(1, 20, 64)
    with torch.no_grad():
        full = block(inp)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = block(inp)
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    torch.testing.assert_close(half, full, atol=0.05 * full.abs().max().item(), rtol=0)


def upcycled_with_yarn(model_type, **moe):
    m = model(model_type)
    hl.patch(m, {"rope": {"type": "yarn", "factor": 2.0}, "moe": {"num_experts": 4, "top_k": 2, "noise": 0.1, **moe}})
    return m


@pytest.mark.parametrize("model_type", list(NATIVE))
def test_native_export_loads_in_plain_transformers_with_identical_logits(model_type, tmp_path):
    m = upcycled_with_yarn(model_type)
    ids = tokens(2, 2 * TRAINED - 8)  # longer than the trained length: the yarn scaling is exercised
    expected = logits(m, ids)
    hl.save_pretrained(m, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == NATIVE[model_type]
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["max_position_embeddings"] == 2 * TRAINED
    assert "hf_longctx" not in config
    assert not (tmp_path / "pytorch_model.bin").exists()
    native = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert native.config.model_type == NATIVE[model_type]
    torch.testing.assert_close(logits(native, ids), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(hl.from_pretrained(tmp_path), ids), expected, atol=1e-4, rtol=0)
    # Routing is not a no-op here: the dense parent gives other logits.
    assert (logits(model(model_type), ids) - expected).abs().max() > 1e-3


def test_qwen_export_keeps_unupcycled_layers_dense(tmp_path):
    m = upcycled_with_yarn("qwen2", layers=[1])
    ids = tokens(1, 100)
    hl.save_pretrained(m, tmp_path)
    native = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert native.config.mlp_only_layers == [0]
    torch.testing.assert_close(logits(native, ids), logits(m, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type,moe", [("gpt_neox", {}), ("phi3", {}), ("llama", {"layers": [0]})])
def test_without_a_native_form_from_pretrained_reapplies_the_patch(model_type, moe, tmp_path):
    m = model(model_type)
    hl.upcycle_moe(m, num_experts=4, top_k=2, noise=0.1, **moe)
    ids = tokens(1, 50)
    expected = logits(m, ids)
    hl.save_pretrained(m, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    loaded = hl.from_pretrained(tmp_path)
    assert hl.applied_sections(loaded)["moe"]["num_experts"] == 4
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=0)


def test_aux_loss_and_loss_equal_the_exported_mixtral(tmp_path):
    m = model("llama")
    hl.upcycle_moe(m, num_experts=4, top_k=2, noise=0.1, router_aux_loss_coef=0.02)
    hl.save_pretrained(m, tmp_path)
    mixtral = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tokens(2, 30)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: the aux loss counts real tokens only
    kwargs = dict(attention_mask=mask, labels=ids, output_router_logits=True)
    with torch.no_grad():
        ours, theirs = m(ids, **kwargs), mixtral(ids, **kwargs)
    assert len(ours.router_logits) == 2 and ours.router_logits[0].shape == (60, 4)
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-6, rtol=1e-5)


def test_training_adds_the_router_losses_and_lowers_the_loss():
    m = model("llama")
    hl.upcycle_moe(m, num_experts=4, top_k=2, noise=0.05, router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    m.train()
    ids = tokens(4, 32)
    out = m(ids, labels=ids)  # training mode: the router losses are on by default
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.router_z_loss)
    assert out.aux_loss > 0 and out.router_z_loss > 0
    lm_loss = m(ids, labels=ids, output_router_logits=False).loss
    torch.testing.assert_close(out.loss, lm_loss + 0.1 * out.aux_loss + 0.01 * out.router_z_loss)
    out.loss.backward()
    for block in get_family(m).mlp_modules(m):
        assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().max() > 0
    optimizer = torch.optim.AdamW(m.parameters(), lr=3e-3)
    optimizer.zero_grad()
    losses = []
    for _ in range(6):
        loss = m(ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.1, losses
    m.eval()
    assert m(ids).get("aux_loss") is None  # evaluation: a plain causal LM output


def test_router_gets_gradients_from_the_aux_loss_alone_with_identical_experts():
    """With copies, any renormalised routing gives the same output: only the aux loss trains the router."""
    m = model("qwen3")
    hl.upcycle_moe(m, num_experts=4, top_k=2, router_z_loss_coef=0.01)
    out = m(tokens(2, 16), labels=tokens(2, 16), output_router_logits=True)
    out.loss.backward()
    assert get_family(m).mlp_modules(m)[1].gate.weight.grad.abs().max() > 0


def test_return_dict_false_gives_a_tuple_with_the_aux_loss():
    m = model("mistral")
    hl.upcycle_moe(m, num_experts=4, top_k=2)
    ids = tokens(1, 12)
    out = m(ids, labels=ids, output_router_logits=True, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0 and out[1].dim() == 0  # loss, aux_loss


@pytest.mark.parametrize(
    "moe,message",
    [
        ({"top_k": 9}, "top_k"),
        ({"num_experts": 5, "init": "partition"}, "does not divide"),
        ({"layers": [0, 7]}, "names layer 7"),
        ({"init": "split"}, "moe.init"),
    ],
)
def test_bad_sections_fail_before_touching_the_model(moe, message):
    m = model("llama")
    mlps = get_family(m).mlp_modules(m)
    with pytest.raises(hl.SpecError, match=message):
        hl.patch(m, {"moe": moe})
    assert get_family(m).mlp_modules(m) == mlps and "forward" not in m.__dict__
    assert "router_aux_loss_coef" not in m.config.to_dict()


def test_unpatch_restores_the_dense_model_bit_for_bit():
    m = model("phi3")
    ids = tokens(1, 20)
    before = logits(m, ids)
    mlps = get_family(m).mlp_modules(m)
    hl.patch(m, "moe-8x2")
    assert hl.applied_sections(m)["moe"] == {}  # the preset is the section's defaults
    hl.unpatch(m)
    assert get_family(m).mlp_modules(m) == mlps and "forward" not in m.__dict__
    assert torch.equal(logits(m, ids), before)
    assert not hasattr(m.config, "router_aux_loss_coef")


def test_preset_is_listed():
    assert "moe-8x2" in hl.list_presets()
