"""The conformance matrix's tiny models of hybrid families (Mamba / Mamba-2 mixers beside attention, KV-shared
layers, chunked attention): each has one layer of every kind of the real model, builds, and every section
passes or is refused with a reason."""

import pytest
from transformers import CONFIG_MAPPING

from hf_longctx.conformance import matrix_config, run_matrix

# model type -> layer kinds its tiny config must have (as transformers' own cache names them)
KINDS = {
    "jamba": {"linear_attention", "full_attention"},
    "bamba": {"linear_attention", "full_attention"},
    "granitemoehybrid": {"linear_attention", "full_attention"},
    "falcon_h1": {"hybrid"},  # a Mamba-2 mixer and attention side by side in every layer
    "gemma3n_text": {"sliding_attention", "full_attention"},
    "llama4_text": {"chunked_attention", "full_attention"},
}


@pytest.mark.parametrize("model_type", [
    pytest.param(t, marks=pytest.mark.skipif(t not in CONFIG_MAPPING, reason=f"no {t} here")) for t in KINDS])
def test_hybrid_family_builds_with_every_kind_of_layer_and_no_cell_fails(model_type):
    config = matrix_config(model_type)
    assert KINDS[model_type] <= set(config.layer_types), config.layer_types
    if model_type == "gemma3n_text":  # its last layers reuse the cache of earlier ones
        assert 0 < config.num_kv_shared_layers < config.num_hidden_layers
    if model_type == "llama4_text":  # a NoPE layer beside the rotary ones, and a chunk that bites
        assert sorted(set(config.no_rope_layers)) == [0, 1] and config.attention_chunk_size < 24
    (row,) = run_matrix([model_type])  # as the matrix runs it (one thread)
    assert row.built == "", row.built
    assert not row.failures, {name: row.cells[name].render() for name in row.failures}
    assert any(cell.status == "pass" for cell in row.cells.values())
    for name, cell in row.cells.items():
        assert cell.status == "pass" or cell.reason, (name, cell)
