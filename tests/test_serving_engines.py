"""Every rope form the project saves, read back by vLLM's and SGLang's own rope code, against transformers.

Each case is a tiny model with a real rope (a default one, or a shipped long-context one), patched and saved
with ``hl.save_pretrained``. ``tests/engines/rope_probe.py`` runs in the engines' own virtualenv (vLLM 0.33 and
SGLang 0.5.23 installed without their CUDA dependencies; ``tests/engines/setup.sh`` builds it) and rotates
queries and keys as each engine builds its rope from the saved ``config.json``. Here they are compared with
the rotation of the patched model itself, at positions over the whole context of two prompts: a short one
(1,024 tokens, under every switch point) and one that fills the context, as a served long prompt does.

The comparison checks the serving table (``hf_longctx.serving``) both ways: where a row says the engine
serves the checkpoint as saved, the rotation must match to 1e-4 of the norm of every rotated vector; where it
says the engine serves it differently, the rotation must differ by more than that for the prompt the row names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_longctx as hl
from hf_longctx.families import get_family
from hf_longctx.hub import serving
from hf_longctx.positions.rope import nested_types
from hf_longctx.serving import AS_SAVED, DIFFERENTLY, NOT_SERVED
from hf_longctx.serving.engines import serving_context
from hf_longctx.testing import long_context_model, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "engines" / "rope_probe.py"
TOLERANCE = 1e-4
SHORT = 1024

LLAMA = dict(max_position_embeddings=8192, rope_parameters=dict(rope_type="default", rope_theta=100000.0))
LONGROPE = dict(type="longrope", factor=4.0, short_factor=[1.0, 1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0],
                long_factor=[1.0, 1.2, 1.6, 2.4, 3.5, 4.0, 4.0, 4.0])


def _llama():
    return tiny_model("llama", **LLAMA)


def _gemma3_text():
    return tiny_model("gemma3_text", max_position_embeddings=131072, sliding_window=8, rope_parameters={
        "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1_000_000.0),
        "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)})


def _shipped(name):
    return lambda: long_context_model(name)


L32, GEMMA, QWEN = "llama-3.2 (llama3 x32)", "gemma-3-4b (linear x8, global layers)", "qwen2.5 (yarn x4)"
PHI35, PHI4 = "phi-3.5-mini (longrope)", "phi-4-mini (longrope, partial rotary 0.75)"

# name -> (model builder, arch as the engines' model files see it, spec or None for the shipped config)
CASES = {
    # each rope type on a default rope
    "default.linear": (_llama, "llama", {"rope": {"type": "linear", "factor": 4}}),
    "default.ntk": (_llama, "llama", {"rope": {"type": "ntk", "factor": 4}}),
    "default.dynamic": (_llama, "llama", {"rope": {"type": "dynamic", "factor": 4}}),
    "default.yarn": (_llama, "llama", {"rope": {"type": "yarn", "factor": 4}}),
    "default.llama3": (_llama, "llama", {"rope": {"type": "llama3", "factor": 4}}),
    "default.longrope": (_llama, "llama", {"rope": LONGROPE}),
    # stacked on llama3 (Llama 3.2), and mode: replace
    "llama3.yarn": (_shipped(L32), "llama", {"rope": {"type": "yarn", "factor": 4}}),
    "llama3.linear": (_shipped(L32), "llama", {"rope": {"type": "linear", "factor": 2}}),
    "llama3.ntk": (_shipped(L32), "llama", {"rope": {"type": "ntk", "factor": 2}}),
    "llama3.llama3": (_shipped(L32), "llama", {"rope": {"type": "llama3", "factor": 2}}),
    "llama3.longrope": (_shipped(L32), "llama", {"rope": LONGROPE}),
    "llama3.dynamic": (_shipped(L32), "llama", {"rope": {"type": "dynamic", "factor": 2}}),
    "llama3.replace.yarn": (_shipped(L32), "llama", {"rope": {"type": "yarn", "factor": 32, "mode": "replace"}}),
    # stacked on linear: Gemma 3's global layers (multimodal and text-only classes)
    "gemma3.yarn": (_shipped(GEMMA), "gemma3", {"rope": {"type": "yarn", "factor": 2}}),
    "gemma3.linear": (_shipped(GEMMA), "gemma3", {"rope": {"type": "linear", "factor": 2}}),
    "gemma3_text.yarn": (_gemma3_text, "gemma3", {"rope": {"type": "yarn", "factor": 2}}),
    # stacked on yarn (Qwen2.5) and on longrope (Phi-3.5)
    "qwen2.yarn": (_shipped(QWEN), "qwen2", {"rope": {"type": "yarn", "factor": 2}}),
    "phi3.linear": (_shipped(PHI35), "phi3", {"rope": {"type": "linear", "factor": 2}}),
    "phi3.yarn": (_shipped(PHI35), "phi3", {"rope": {"type": "yarn", "factor": 2}}),
    # partial rotary
    "phi4.linear": (_shipped(PHI4), "phi3", {"rope": {"type": "linear", "factor": 2}}),
    "stablelm.yarn": (lambda: tiny_model("stablelm", max_position_embeddings=4096), "stablelm",
                      {"rope": {"type": "yarn", "factor": 4}}),
    # shipped configs, unpatched
    "shipped.llama3": (_shipped(L32), "llama", None),
    "shipped.gemma3": (_shipped(GEMMA), "gemma3", None),
    "shipped.qwen2": (_shipped(QWEN), "qwen2", None),
    "shipped.phi3": (_shipped(PHI35), "phi3", None),
    "shipped.phi4": (_shipped(PHI4), "phi3", None),
}


def _engines_python() -> str | None:
    given = os.environ.get("HF_LONGCTX_ENGINES_PYTHON")
    if given:
        return given
    local = ROOT / ".venv-engines" / "bin" / "python"
    return str(local) if local.exists() else None


def _positions(length: int) -> torch.Tensor:
    spread = torch.linspace(0, length - 1, 192).round().long()
    return torch.unique(torch.cat([torch.arange(16), spread, torch.tensor([length - 1])]))


def _rotate(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """transformers' rotate-half rotation of the first cos.shape[-1] dims of each head (the rest pass)."""
    x = q.view(q.shape[0], -1, head_dim)
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat([out, rest], dim=-1).reshape(q.shape)


def _transformers(model, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
    """The patched model's own rotation (its rotary module, as its attention applies it)."""
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rotary = get_family(model).rotary_embedding(model)
    out = {}
    for layer_type in nested_types(text) or ["all"]:
        if text.rope_parameters.get(layer_type, {}) is None:
            continue
        kwargs = {} if layer_type == "all" else {"layer_type": layer_type}
        with torch.no_grad():
            cos, sin = rotary(q[None], positions[None], **kwargs)
        out[f"q.{layer_type}"] = _rotate(q, cos[0], sin[0], head_dim)
        out[f"k.{layer_type}"] = _rotate(k, cos[0], sin[0], head_dim)
    return out


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """Save every case, run the probe once in the engines' virtualenv; name -> (rows, {prompt: (ours, dir)})."""
    python = _engines_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("the engines' virtualenv is missing: .ci/run builds it with tests/engines/setup.sh")
        pytest.skip("no engines' virtualenv (tests/engines/setup.sh builds .venv-engines)")
    root = tmp_path_factory.mktemp("engines")
    manifest, results = [], {}
    for name, (build, arch, spec) in CASES.items():
        model = build()
        if spec is not None:
            hl.patch(model, spec)
        folder = root / name
        hl.save_pretrained(model, folder)
        rows = {row.engine: row for row in serving(model)}
        context = serving_context({**model.config.to_dict(), "hf_longctx": model.config.hf_longctx}
                                  if spec is not None else model.config.to_dict())
        text = model.config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        prompts = {}
        for prompt, length in (("short", SHORT), ("long", context)):
            positions = _positions(length)
            generator = torch.Generator().manual_seed(len(name) + length)
            q = torch.randn(len(positions), 2 * head_dim, generator=generator)
            k = torch.randn(len(positions), head_dim, generator=generator)
            inputs = root / f"{name}.{prompt}.inputs.safetensors"
            save_file({"positions": positions, "q": q, "k": k}, str(inputs))
            prompts[prompt] = _transformers(model, positions, q, k)
            manifest.append(dict(name=f"{name}.{prompt}", dir=str(folder), arch=arch, max_model_len=context,
                                 inputs=str(inputs)))
        results[name] = (rows, prompts)
    (root / "manifest.json").write_text(json.dumps(manifest))
    out = root / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([python, str(PROBE), str(root / "manifest.json"), str(out)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return results, out


def _error(engine_out: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> float:
    """Largest distance between the engine's and transformers' rotated queries or keys at one position, relative
    to their norm."""
    worst = 0.0
    for key, reference in ours.items():
        diff = (engine_out[key] - reference).norm(dim=-1) / reference.norm(dim=-1)
        worst = max(worst, float(diff.max()))
    return worst


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("name", list(CASES))
def test_engine_rotation_is_what_the_serving_table_says(probed, name, engine):
    results, out = probed
    rows, prompts = results[name]
    row = rows[engine]
    for index, prompt in enumerate(("short", "long")):
        stem = out / f"{name}.{prompt}.{engine}"
        error_file, expected = Path(f"{stem}.error"), row.alone[index]
        if row.status == NOT_SERVED or expected is None:
            assert error_file.exists(), f"{engine}, {prompt} prompt: rotated, yet the table says: {row.line()}"
            continue
        assert not error_file.exists(), f"{engine} failed on {name}: {error_file.read_text()[-2000:]}"
        error = _error(load_file(f"{stem}.safetensors"), prompts[prompt])
        if row.status == AS_SAVED or expected:
            assert error <= TOLERANCE, f"{engine}, {prompt} prompt: {error:.2e} of the norm; the table says: {row.line()}"
        else:
            assert row.status == DIFFERENTLY
            assert error > TOLERANCE, f"{engine}, {prompt} prompt: the same rotation; the table says: {row.line()}"


@pytest.mark.parametrize("name", ["llama3.yarn", "llama3.linear", "llama3.ntk", "llama3.llama3", "qwen2.yarn",
                                  "llama3.replace.yarn", "default.yarn", "default.linear", "default.llama3"])
def test_stacked_static_ropes_are_served_as_saved(probed, name):
    """The README's first example (Llama 3.2's rope with yarn x4 on top) and every static rope stacked on a
    shipped one: vLLM and SGLang serve them as saved (their rotation was checked above)."""
    results, _ = probed
    rows, _ = results[name]
    assert rows["vllm"].status == AS_SAVED, rows["vllm"].line()
    assert rows["sglang"].status == AS_SAVED, rows["sglang"].line()
