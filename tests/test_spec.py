"""Spec loading and validation: presets, YAML, dicts, and a table of rejected specs."""

import pytest
from conftest import assert_same, snapshot, tokens

import hf_longctx as hl
from hf_longctx.testing import tiny_model

BAD_SPECS = [
    ({"ropes": {"type": "yarn", "factor": 2}}, "unknown spec section 'ropes'"),
    ({"rope": {"type": "yarn", "factr": 2}}, "unknown key 'rope.factr'"),
    ({"rope": {"type": "quadratic", "factor": 2}}, "'rope.type' must be 'linear' \\| 'ntk'"),
    ({"rope": {"type": "yarn", "factor": 0.5}}, "'rope.factor' = 0.5 is invalid: the factor must be >= 1"),
    ({"rope": {"type": "yarn", "factor": "4x"}}, "'rope.factor' must be float \\| null, got str '4x'"),
    ({"rope": {"type": "yarn", "factor": True}}, "'rope.factor' must be float \\| null, got bool True"),
    ({"rope": {"factor": 4}}, "'rope.type' = None is invalid"),
    ({"rope": {"type": "yarn"}}, "give exactly one of 'rope.factor' and 'rope.target_context'"),
    ({"rope": {"type": "yarn", "factor": 2, "target_context": 4096}}, "give exactly one"),
    ({"rope": {"type": "linear", "factor": 2, "beta_fast": 16}}, "'rope.beta_fast'.*only used by rope type\\(s\\) yarn"),
    ({"rope": {"type": "yarn", "factor": 2}, "alibi": {}}, "'rope' and 'alibi' cannot be combined"),
    ({"alibi": {"max_bias": 8}}, "unknown key 'alibi.max_bias'; allowed keys: layers"),
    ({"attention": {"sliding_window": 0}}, "'attention.sliding_window' = 0 is invalid"),
    ({"attention": {"backend": "cuda"}}, "'attention.backend' must be 'auto' \\| 'triton'"),
    ({"streaming": {"window": -3}}, "'streaming.window' = -3 is invalid"),
    ({"moe": {"num_experts": 4, "top_k": 6}}, "'moe.top_k' = 6 is invalid: must be <= num_experts \\(4\\)"),
    ({"memory": {"segment_length": 0}}, "'memory.segment_length' = 0 is invalid"),
    ({"rope": ["yarn", 4]}, "spec section 'rope' must be a mapping"),
    ({}, "the spec is empty"),
    ("yarn-4000x", "unknown preset 'yarn-4000x'; available presets: .*yarn-4x"),
    ("does/not/exist.yaml", "spec file 'does/not/exist.yaml' does not exist"),
]


@pytest.mark.parametrize("spec,message", BAD_SPECS, ids=[str(i) for i in range(len(BAD_SPECS))])
def test_bad_spec_is_rejected_with_a_message_naming_it(spec, message):
    with pytest.raises(hl.SpecError, match=message):
        hl.load_spec(spec)


@pytest.mark.parametrize("spec,message", BAD_SPECS[:12], ids=[str(i) for i in range(12)])
def test_rejected_spec_leaves_the_model_bit_identical(spec, message):
    model = tiny_model("llama")
    x = tokens()
    snap = snapshot(model, x)
    with pytest.raises(hl.SpecError):
        hl.patch(model, spec)
    assert_same(model, x, snap)


def test_every_preset_loads_and_has_a_description():
    presets = hl.list_presets()
    assert len(presets) >= 8
    for name, description in presets.items():
        assert description, name
        assert hl.load_spec(name).sections(), name


def test_yaml_file_dict_and_preset_give_the_same_spec(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("# my spec\nrope:\n  type: yarn\n  factor: 4.0\n")
    from_file = hl.load_spec(path)
    assert from_file == hl.load_spec("yarn-4x") == hl.load_spec({"rope": {"type": "yarn", "factor": 4.0}})
    assert hl.load_spec(str(path)) == from_file


def test_overrides_replace_sections():
    spec = hl.load_spec("yarn-4x", rope={"type": "ntk", "factor": 2.0})
    assert spec.rope.type == "ntk" and spec.rope.factor == 2.0


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("rope: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(Exception) as info:
        hl.load_spec(path)
    assert "could not determine a constructor" in str(info.value)


def test_spec_round_trips_through_its_dict():
    spec = hl.load_spec({"rope": {"type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}})
    assert hl.PatchSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict() == {"rope": {"type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}}
