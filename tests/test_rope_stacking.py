"""RoPE sections stacked on the rope that long-context checkpoints ship (Llama 3.x, Gemma 3, gpt-oss, Qwen2.5
with YaRN, Phi-3.5 / Phi-4-mini): tiny random weights, the checkpoints' real rope parameters.

Oracles: the rotation every stacked type gives, frequency by frequency, against a from-scratch reference of
the documented rule on transformers' own shipped frequencies (``reference_stacked_rotation``); logits at
position ids 2p after linear x2 against the unpatched logits at p; plain transformers (or
``hf_longctx.from_pretrained`` where no rope type expresses the result) after saving; unpatch bit for bit.
"""

import copy
import math

import pytest
import torch
from conftest import tokens

import hf_longctx as hl
from hf_longctx.positions.rope import native
from hf_longctx.testing import LONG_CONTEXT_CONFIGS, long_context_model, reference_stacked_rotation

NAMES = list(LONG_CONTEXT_CONFIGS)
TYPES = ["linear", "ntk", "dynamic", "yarn", "llama3", "longrope"]
INIT = 0.2


def runs_longrope_per_layer_type():
    """Whether transformers' own Gemma 3 rotary runs a LongRoPE on one layer type twice past its switch (5.14
    fails on the second call: a name error in its frequency update)."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    config = Gemma3TextConfig(hidden_size=32, head_dim=8, num_attention_heads=4, max_position_embeddings=64,
                              rope_parameters={"full_attention": dict(rope_type="longrope", rope_theta=1e4,
                                                                      short_factor=[1.0] * 4, long_factor=[2.0] * 4,
                                                                      original_max_position_embeddings=16),
                                               "sliding_attention": dict(rope_type="default", rope_theta=1e4)})
    rotary = Gemma3RotaryEmbedding(config)
    try:
        for _ in range(2):
            rotary(torch.zeros(1, 1, 1), torch.tensor([[0, 40]]), layer_type="full_attention")
    except Exception:  # noqa: BLE001
        return False
    return True


PER_LAYER_LONGROPE = runs_longrope_per_layer_type()


def shipped_type(model):
    return (text(model).rope_parameters.get("full_attention") or text(model).rope_parameters)["rope_type"]


def expect_native(model, kind, shipped):
    """Static results have a transformers rope type: LongRoPE, where transformers runs it on the layer type
    (linear on Gemma 3's linear stays linear)."""
    if kind == "dynamic" or (kind == "longrope" and shipped == "longrope"):
        return False  # two switch points, or dynamic NTK on a scaled rope: held in memory
    return scaled_layer_type(model) is None or PER_LAYER_LONGROPE or kind == "linear"


def text(model):
    return model.config.get_text_config(decoder=True)


def rotary(model):
    return hl.families.get_family(model).rotary_embedding(model)


def scaled_layer_type(model):
    return "full_attention" if "full_attention" in (text(model).rope_parameters or {}) else None


def longrope_lists(model, top):
    half = len(rotation(model, 1)[0])
    return ([1.0 + 0.5 * i / (half - 1) for i in range(half)], [1.0 + (top - 1.0) * i / (half - 1) for i in range(half)])


def section(model, kind, factor=4.0):
    out = {"type": kind, "factor": factor}
    if kind == "longrope":
        out["short_factor"], out["long_factor"] = longrope_lists(model, factor)
    return out


def rotation(model, length):
    """The frequencies and attention factor the model's rotary uses for a sequence of ``length`` tokens."""
    module, layer_type = rotary(model), scaled_layer_type(model)
    positions = torch.tensor([[0, length - 1]])
    with torch.no_grad():
        if layer_type is None:
            module(torch.zeros(1, 1, 1), positions)
            return module.inv_freq.double().tolist(), float(module.attention_scaling)
        module(torch.zeros(1, 1, 1), positions, layer_type=layer_type)
        return (getattr(module, f"{layer_type}_inv_freq").double().tolist(),
                float(getattr(module, f"{layer_type}_attention_scaling")))


def assert_rotation(model, shipped_config, spec, length):
    ours, ours_attention = rotation(model, length)
    expected, attention = reference_stacked_rotation(shipped_config, spec, length, scaled_layer_type(model))
    assert len(ours) == len(expected)
    for i, (a, b) in enumerate(zip(ours, expected)):
        assert a == pytest.approx(b, rel=2e-6, abs=0.0), (i, ours, expected)
    assert ours_attention == pytest.approx(attention, rel=1e-6)


def logits(model, x, positions=None):
    # an explicit mask: spread position ids would otherwise be read as packed one-token documents
    with torch.no_grad():
        return model(x, position_ids=positions, attention_mask=torch.ones_like(x)).logits


def close(a, b, tolerance):
    return (a - b).abs().max().item() <= tolerance * b.abs().max().item()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", TYPES)
def test_each_type_stacks_on_each_shipped_scaling_by_the_rule(name, kind):
    model = long_context_model(name, initializer_range=INIT)
    shipped = copy.deepcopy(text(model))
    x, p = tokens(length=16, vocab=shipped.vocab_size), 150_000 + torch.arange(16)[None]
    snapshot = logits(model, x, p), model.config.to_dict()
    before = {length: rotation(model, length) for length in (64, 100_000)}
    spec = section(model, kind)
    kind_shipped = shipped_type(model)
    hl.patch(model, {"rope": spec})
    assert text(model).max_position_embeddings == (131072 if kind == "dynamic" else 4 * 131072)
    # short and long sequences, on both sides of a LongRoPE switch (4096 -> 16384) and of the context
    for length in (64, 8192, 100_000, 300_000, 600_000):
        assert_rotation(model, shipped, spec, length)
    assert native(model) == expect_native(model, kind, kind_shipped)
    assert not torch.equal(logits(model, x, p), snapshot[0])
    hl.unpatch(model)
    assert torch.equal(logits(model, x, p), snapshot[0]) and model.config.to_dict() == snapshot[1]
    assert {length: rotation(model, length) for length in (64, 100_000)} == before


@pytest.mark.parametrize("name", NAMES)
def test_linear_x2_at_2p_equals_the_shipped_model_at_p(name):
    model = long_context_model(name, initializer_range=INIT)
    x = tokens(length=24, vocab=text(model).vocab_size)
    for stride in (1, 1500, 5000):  # inside a LongRoPE's short regime, across its switch, far beyond it
        p = torch.arange(24)[None] * stride
        reference = logits(model, x, p)
        spec = {"type": "linear", "factor": 2}
        if scaled_layer_type(model):  # the oracle needs every layer scaled: Gemma 3's local layers too
            spec["layer_types"] = ["full_attention", "sliding_attention"]
        hl.patch(model, {"rope": spec})
        assert close(logits(model, x, 2 * p), reference, 1e-4), stride
        assert not close(logits(model, x, p), reference, 1e-3)  # the positions matter: the oracle can fail
        hl.unpatch(model)


@pytest.mark.parametrize("name", NAMES)
def test_target_context_is_a_factor_of_the_current_context(name):
    model = long_context_model(name, initializer_range=INIT)
    x, p = tokens(length=16, vocab=text(model).vocab_size), torch.arange(16)[None] * 9000
    hl.patch(model, {"rope": {"type": "yarn", "factor": 2}})
    by_factor = logits(model, x, p)
    hl.unpatch(model)
    hl.patch(model, {"rope": {"type": "yarn", "target_context": 2 * text(model).max_position_embeddings}})
    assert text(model).max_position_embeddings == 2 * 131072
    assert torch.equal(logits(model, x, p), by_factor)


@pytest.mark.parametrize("name", NAMES)
def test_yarn_x4_keeps_the_fastest_frequency_and_divides_the_slowest(name):
    model = long_context_model(name, initializer_range=INIT)
    (before, attention), local = rotation(model, 100_000), None
    if scaled_layer_type(model):
        local = rotary(model).sliding_attention_inv_freq.clone()
    hl.patch(model, {"rope": {"type": "yarn", "factor": 4}})
    after, attention_after = rotation(model, 4 * 100_000)
    assert after[0] == pytest.approx(before[0], rel=1e-6)
    assert after[-1] == pytest.approx(before[-1] / 4, rel=1e-6)
    assert attention_after == pytest.approx(attention * (0.1 * math.log(4) + 1), rel=1e-6)
    if local is not None:  # Gemma 3's local layers keep their rotation
        assert torch.equal(rotary(model).sliding_attention_inv_freq, local)


@pytest.mark.parametrize("name,kind", [(name, kind) for name in NAMES for kind in ("yarn", "dynamic")]
                         + [("phi-3.5-mini (longrope)", "longrope")])
def test_save_and_reload_reproduce_the_stacked_model(tmp_path, name, kind):
    from transformers import AutoModelForCausalLM

    model = long_context_model(name, initializer_range=INIT)
    x, p = tokens(length=16, vocab=text(model).vocab_size), torch.arange(16)[None] * 40_000
    shipped, kind_shipped = logits(model, x, p), shipped_type(model)
    hl.patch(model, {"rope": section(model, kind)})
    ours = logits(model, x, p)
    assert not close(ours, shipped, 1e-3)
    hl.save_pretrained(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert native(model) == expect_native(model, kind, kind_shipped)
    if native(model):
        assert close(logits(plain, x, p), ours, 1e-5)
    else:  # no rope type holds the result: the shipped rope is saved, the plugin re-applies
        assert not native(model) and close(logits(plain, x, p), shipped, 1e-5)
        assert "hf_longctx.from_pretrained` re-applies" in hl.hub.model_card(model)
    reloaded = hl.from_pretrained(tmp_path).eval()
    assert close(logits(reloaded, x, p), ours, 1e-5)


def test_mode_replace_scales_the_unscaled_rope_from_the_original_length():
    from transformers import AutoModelForCausalLM

    model = long_context_model("llama-3.2 (llama3 x32)", initializer_range=INIT)
    x, p = tokens(length=16), torch.arange(16)[None] * 30_000
    hl.patch(model, {"rope": {"type": "yarn", "factor": 64, "mode": "replace"}})
    assert text(model).max_position_embeddings == 64 * 8192
    config = copy.deepcopy(model.config)
    del config.hf_longctx
    config.rope_parameters = {"rope_type": "yarn", "factor": 64.0, "original_max_position_embeddings": 8192,
                              "rope_theta": 500000.0}
    twin = AutoModelForCausalLM.from_config(config).eval()
    twin.load_state_dict(model.state_dict())
    assert close(logits(model, x, p), logits(twin, x, p), 1e-5)


def test_a_dynamic_shipped_rope_and_a_truncated_stacked_yarn_are_refused():
    model = long_context_model("llama-3.2 (llama3 x32)", initializer_range=INIT)
    with pytest.raises(hl.SpecError, match="truncate"):
        hl.patch(model, {"rope": {"type": "yarn", "factor": 2, "truncate": True}})
    model = long_context_model("qwen2.5 (yarn x4)", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                     "rope_theta": 1e6})
    with pytest.raises(hl.SpecError, match="changes its frequencies with the sequence length"):
        hl.patch(model, {"rope": {"type": "linear", "factor": 2}})
    hl.patch(model, {"rope": {"type": "linear", "factor": 2, "mode": "replace"}})  # replace throws it away


def test_the_readme_example_on_the_llama_3_2_config(tmp_path):
    from transformers import AutoModelForCausalLM

    model = long_context_model("llama-3.2 (llama3 x32)", initializer_range=INIT)
    x, p = tokens(length=16), torch.arange(16)[None] * 20_000
    before = logits(model, x, p)
    hl.patch(model, {"rope": {"type": "yarn", "factor": 4}})  # as in the README
    assert model.config.max_position_embeddings == 524288
    ours = logits(model, x, p)
    hl.save_pretrained(model, tmp_path)
    assert close(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), x, p), ours, 1e-5)
    hl.unpatch(model)
    assert torch.equal(logits(model, x, p), before)
