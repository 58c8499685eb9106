"""GGUF output for llama.cpp: the written rotation is the patched model's, the tensors are its weights.

The rope check reads the file as llama.cpp's llama architecture does (scaling type none: pair ``i`` turns by
``base^(-2i/d) / rope_freqs[i]``, cos and sin times ``rope.scaling.attn_factor``) and compares with the patched
model's own frequencies and attention factor. The tensor check loads the file back with transformers' GGUF
reader (which undoes llama.cpp's query/key pair order) through ``hl.from_pretrained``, which re-applies the
recorded patch: the logits must be the patched model's. The end-to-end check against llama.cpp itself (it
builds from source in about 40 minutes) is ``benchmarks/llama_cpp_agreement.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import hf_longctx as hl  # noqa: E402
from hf_longctx.cli import main  # noqa: E402
from hf_longctx.config_base import SpecError  # noqa: E402
from hf_longctx.families import get_family  # noqa: E402
from hf_longctx.serving.gguf import write_gguf  # noqa: E402
from hf_longctx.testing import long_context_model, tiny_model  # noqa: E402

L32 = "llama-3.2 (llama3 x32)"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog; hello world"] * 20, trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder, tokenizer.get_vocab_size()


def _fields(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _llama_cpp_frequencies(path) -> tuple[torch.Tensor, float]:
    fields, tensors = _fields(path)
    dim, base = int(fields["llama.rope.dimension_count"]), float(fields["llama.rope.freq_base"])
    assert fields.get("llama.rope.scaling.type", "none") == "none"  # no other llama.cpp scaling on top
    factors = torch.ones(dim // 2, dtype=torch.float64)
    if "rope_freqs.weight" in tensors:
        factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data, dtype=np.float64))
    unscaled = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return unscaled / factors, float(fields.get("llama.rope.scaling.attn_factor", 1.0))


def _model_frequencies(model) -> tuple[torch.Tensor, float]:
    rotary = get_family(model).rotary_embedding(model)
    context = model.config.max_position_embeddings
    with torch.no_grad():
        rotary(torch.zeros(1, 1, 1), torch.tensor([[0, context - 1]]))
    return rotary.inv_freq.double(), float(rotary.attention_scaling)


@pytest.mark.parametrize("name, spec", [
    ("default", {"rope": {"type": "yarn", "factor": 4}}),
    ("default", {"rope": {"type": "ntk", "factor": 4}}),
    ("default", {"rope": {"type": "linear", "factor": 2}}),
    (L32, {"rope": {"type": "yarn", "factor": 4}}),      # stacked on llama3
    (L32, {"rope": {"type": "linear", "factor": 2}}),
    (L32, None),                                          # the shipped llama3 rope itself
])
def test_the_written_rotation_is_the_patched_models(tmp_path, tokenizer_dir, name, spec):
    folder, vocab = tokenizer_dir
    model = (tiny_model("llama", vocab_size=vocab, max_position_embeddings=8192) if name == "default"
             else long_context_model(name, vocab_size=vocab))
    if spec is not None:
        hl.patch(model, spec)
    path = write_gguf(model, tmp_path / "model.gguf", tokenizer=folder)
    got, attention = _llama_cpp_frequencies(path)
    wanted, wanted_attention = _model_frequencies(model)
    assert torch.allclose(got, wanted, rtol=1e-6, atol=0), (got / wanted)
    assert attention == pytest.approx(wanted_attention, rel=1e-7)
    fields, _ = _fields(path)
    assert fields["llama.context_length"] == model.config.max_position_embeddings


def test_a_gguf_loads_back_as_the_patched_model(tmp_path, tokenizer_dir):
    folder, vocab = tokenizer_dir
    model = long_context_model(L32, vocab_size=vocab)
    hl.patch(model, {"rope": {"type": "yarn", "factor": 4}})
    path = write_gguf(model, tmp_path / "model.gguf", tokenizer=folder)
    reloaded = hl.from_pretrained(path).eval()
    assert hl.applied_sections(reloaded) == hl.applied_sections(model)
    ids = torch.randint(0, vocab, (1, 48))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_from_a_gguf_the_tensors_and_tokenizer_are_kept_and_the_rope_rewritten(tmp_path, tokenizer_dir):
    folder, vocab = tokenizer_dir
    source = write_gguf(tiny_model("llama", vocab_size=vocab, max_position_embeddings=8192), tmp_path / "src.gguf",
                        tokenizer=folder, dtype="f16")
    model = hl.from_pretrained(source).eval()
    hl.patch(model, {"rope": {"type": "yarn", "factor": 2}})
    out = write_gguf(model, tmp_path / "out.gguf", source=source)
    before, after = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(out))
    kept = {t.name: t for t in before.tensors}
    written = {t.name: t for t in after.tensors}
    assert "rope_freqs.weight" not in kept  # the unscaled source needs none
    assert set(written) == set(kept) | {"rope_freqs.weight"}
    for name, tensor in kept.items():
        assert written[name].tensor_type == tensor.tensor_type
        assert np.array_equal(np.asarray(written[name].data), np.asarray(tensor.data)), name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.model"):
        assert after.fields[key].contents() == before.fields[key].contents()
    got, attention = _llama_cpp_frequencies(out)
    wanted, wanted_attention = _model_frequencies(model)
    assert torch.allclose(got, wanted, rtol=1e-6, atol=0)
    assert attention == pytest.approx(wanted_attention, rel=1e-7)
    assert _fields(out)[0]["llama.context_length"] == 16384


def test_the_command_line_writes_a_gguf_from_a_gguf(tmp_path, tokenizer_dir, capsys):
    folder, vocab = tokenizer_dir
    source = write_gguf(tiny_model("llama", vocab_size=vocab, max_position_embeddings=8192), tmp_path / "src.gguf",
                        tokenizer=folder)
    assert main(["patch", str(source), "--preset", "yarn-4x", "--out", str(tmp_path / "out.gguf")]) in (0, None)
    assert "Wrote" in capsys.readouterr().out
    assert _fields(tmp_path / "out.gguf")[0]["llama.context_length"] == 4 * 8192


@pytest.mark.parametrize("build, spec, message", [
    (lambda v: tiny_model("llama", vocab_size=v), {"rope": {"type": "dynamic", "factor": 2}}, "changes with the sequence"),
    (lambda v: long_context_model(L32, vocab_size=v), {"rope": {"type": "dynamic", "factor": 2}}, "changes with the sequence"),
    (lambda v: tiny_model("qwen2", vocab_size=v), {"rope": {"type": "yarn", "factor": 2}}, "not 'qwen2'"),
    (lambda v: tiny_model("llama", vocab_size=v), {"attention": {"sink_tokens": 4, "learnable_sinks": True,
                                                                  "sliding_window": 16}}, "no llama.cpp tensor"),
])
def test_what_llama_cpp_cannot_run_is_refused(tmp_path, tokenizer_dir, build, spec, message):
    folder, vocab = tokenizer_dir
    model = build(vocab)
    hl.patch(model, spec)
    with pytest.raises(SpecError, match=message):
        write_gguf(model, tmp_path / "x.gguf", tokenizer=folder)
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob("*.partial"))
