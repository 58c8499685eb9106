"""The serving table reaches the user: the model card's Serving section and one logged line per engine that
serves a checkpoint differently. (Whether each row is true is checked against the engines' own code in
tests/test_serving_engines.py.)"""

from __future__ import annotations

import json
import logging
import math

import pytest

import hf_longctx as hl
from hf_longctx.hub import model_card, serving
from hf_longctx.serving import AS_SAVED, DIFFERENTLY, ENGINES, NOT_SERVED, serving_rows
from hf_longctx.serving.engines import longrope_attention
from hf_longctx.testing import long_context_model, tiny_model

L32 = "llama-3.2 (llama3 x32)"


def test_a_stacked_rope_is_saved_with_the_attention_factor_the_engines_read(tmp_path):
    model = long_context_model(L32)
    hl.patch(model, {"rope": {"type": "yarn", "factor": 4}})
    hl.save_pretrained(model, tmp_path)
    params = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert params["rope_type"] == "longrope" and params["short_factor"] == params["long_factor"]
    ours, short, long = longrope_attention(params, 4 * 131072)
    assert ours == pytest.approx(0.1 * math.log(4) + 1)  # yarn's attention factor, x4
    assert short == long == ours


def test_without_the_mscale_keys_the_table_says_the_engines_differ():
    params = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8, "rope_theta": 1e4,
              "original_max_position_embeddings": 8192, "attention_factor": 1.0}
    config = {"model_type": "llama", "max_position_embeddings": 32768, "rope_parameters": params}
    rows = {row.engine: row for row in serving_rows(config)}
    assert rows["vllm"].status == rows["sglang"].status == DIFFERENTLY
    assert "1.0000" in rows["vllm"].line() and "instead of" in rows["vllm"].line()
    with_keys = {**config, "rope_parameters": {**params, "short_mscale": 1.0, "long_mscale": 1.0}}
    assert all(row.status == AS_SAVED for row in serving_rows(with_keys) if row.engine in ("vllm", "sglang"))


def test_save_pretrained_logs_one_line_per_engine_that_differs(tmp_path, caplog):
    model = tiny_model("llama", max_position_embeddings=256)
    hl.patch(model, {"rope": {"type": "dynamic", "factor": 4}})
    with caplog.at_level(logging.WARNING, logger="hf_longctx.hub"):
        hl.save_pretrained(model, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_longctx.hub"]
    for engine in ("vllm", "sglang", "llama.cpp", "gguf"):
        assert sum(ENGINES[engine] + ":" in line for line in lines) == 1, (engine, lines)
    assert any("fixed NTK base" in line for line in lines)


def test_a_checkpoint_every_engine_serves_as_saved_logs_nothing(tmp_path, caplog):
    model = tiny_model("llama", max_position_embeddings=256)
    hl.patch(model, {"rope": {"type": "yarn", "factor": 4}})
    with caplog.at_level(logging.WARNING, logger="hf_longctx.hub"):
        hl.save_pretrained(model, tmp_path)
    assert not [r for r in caplog.records if r.name == "hf_longctx.hub"]


def test_the_model_card_has_a_serving_row_per_engine():
    model = tiny_model("llama", max_position_embeddings=256)
    hl.patch(model, {"rope": {"type": "yarn", "factor": 4}, "streaming": {"sink_tokens": 4, "window": 60}})
    card = model_card(model)
    section = card.split("## Serving", 1)[1]
    for name in ENGINES.values():
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        assert "served differently" in row and "streaming" in row


@pytest.mark.parametrize("spec, engine, status", [
    ({"memory": {"memory_tokens": 4, "segment_length": 32}}, "vllm", NOT_SERVED),
    ({"extend": {"method": "dual_chunk", "chunk_size": 64, "local_size": 8}}, "vllm", NOT_SERVED),
    ({"alibi": {}}, "sglang", DIFFERENTLY),
    ({"attention": {"sliding_window": 32, "sink_tokens": 4}}, "llama.cpp", DIFFERENTLY),
])
def test_patches_the_engines_do_not_run_are_named(spec, engine, status):
    model = tiny_model("llama", max_position_embeddings=256)
    model = hl.patch(model, spec)
    rows = {row.engine: row for row in serving(model)}
    assert rows[engine].status == status, rows[engine].line()
