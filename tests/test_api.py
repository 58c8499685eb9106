"""The public API: every name DESIGN.md promises resolves from the top-level package."""

import hf_longctx as hl


def test_every_public_name_resolves():
    for name in hl.__all__:
        assert getattr(hl, name) is not None, name
    for name in ("patch", "unpatch", "save_pretrained", "from_pretrained", "push_to_hub", "list_presets",
                 "load_spec", "SinkCache", "flash_attention", "RecurrentMemoryModel", "upcycle_moe"):
        assert name in hl.__all__, name


def test_subpackages_are_reachable_as_attributes():
    assert callable(hl.evaluation.streaming_perplexity)
    assert callable(hl.evaluation.perplexity_vs_length)
    assert hl.training.__name__ == "hf_longctx.training"
