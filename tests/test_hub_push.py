"""push_to_hub against a fake Hub on 127.0.0.1, with the real huggingface_hub client.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME`` and offline mode into module constants at
import time, so the client side (push, then reload from the Hub) runs in a subprocess started
with that environment, exactly as a user's process would: this file is also its script. The
subprocess pushes an unpatched tiny Llama as the base repo, loads it back from the Hub, patches
it with each spec, pushes it, reloads it with ``hf_longctx.from_pretrained`` (and plain
``AutoModelForCausalLM`` for the natively exported YaRN), and saves the logits of the pushed
and reloaded models. The tests then inspect what the server received and compare the logits.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save_file

from fake_hub import FakeHub

TOKEN = "hf_fake_hub_token"
BASE_REPO = "tester/tiny-llama"
SPECS = {
    "yarn": {"rope": {"type": "yarn", "factor": 4}},
    "alibi": {"alibi": {}},
    "memory": {"memory": {"memory_tokens": 2, "segment_length": 8}},  # a wrapper with its own weights
}
NATIVE = {"yarn"}  # specs whose checkpoint plain transformers loads to the same logits
SEQ_LEN = 160  # beyond the 64 trained positions, within YaRN's 4x = 256


def repo_id(name: str) -> str:
    return f"tester/tiny-llama-{name}"


def _push_and_reload(out: Path) -> None:
    """Client side (run in the subprocess): push, reload, write ``out/<name>.safetensors`` logits."""
    from conftest import tokens
    from transformers import AutoModelForCausalLM

    import hf_longctx
    from hf_longctx.testing import tiny_model

    hf_longctx.push_to_hub(tiny_model("llama"), BASE_REPO)
    ids = tokens(batch=2, length=SEQ_LEN)
    urls = {}
    for name, spec in SPECS.items():
        model = hf_longctx.patch(AutoModelForCausalLM.from_pretrained(BASE_REPO).eval(), spec)
        urls[name] = hf_longctx.push_to_hub(model, repo_id(name))
        models = {"pushed": model, "reloaded": hf_longctx.from_pretrained(repo_id(name))}
        if name in NATIVE:
            models["plain"] = AutoModelForCausalLM.from_pretrained(repo_id(name))
        with torch.no_grad():
            logits = {key: m.eval()(ids).logits.contiguous() for key, m in models.items()}
        save_file(logits, str(out / f"{name}.safetensors"))
    (out / "commit_urls.json").write_text(json.dumps(urls))


@pytest.fixture(scope="module")
def pushed():
    """(hub, folder with the client's logits) after the subprocess pushed and reloaded every spec."""
    with FakeHub(token=TOKEN, lifetime_s=300) as hub, tempfile.TemporaryDirectory() as tmp:
        home, out = Path(tmp, "hf_home"), Path(tmp, "out")
        out.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
        env.update(
            HF_ENDPOINT=hub.endpoint,
            HF_HOME=str(home),  # empty cache: every file must come from the server
            HF_HUB_OFFLINE="0",
            HF_TOKEN=TOKEN,
            HF_HUB_DISABLE_TELEMETRY="1",  # usage pings are not part of what is tested
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        proc = subprocess.run(
            [sys.executable, __file__, str(out)],
            env=env,
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, f"client failed:\n{proc.stdout}\n{proc.stderr[-6000:]}\nrequests: {hub.requests}"
        yield hub, out


@pytest.mark.parametrize("name", SPECS)
def test_pushed_files_arrive(pushed, name):
    """config.json with the spec, the tiny model's exact weights and the model card reach the server."""
    from hf_longctx.testing import tiny_model

    hub, out = pushed
    files = hub.files(repo_id(name))
    assert {"config.json", "model.safetensors", "README.md"} <= set(files), sorted(files)

    config = json.loads(files["config.json"])
    assert config["hf_longctx"] == SPECS[name]
    expected_context = 256 if name == "yarn" else 64
    assert config["max_position_embeddings"] == expected_context
    if name == "yarn":  # native export: transformers' own rope_parameters
        assert config["rope_parameters"]["rope_type"] == "yarn"
        assert config["rope_parameters"]["factor"] == 4
        assert config["rope_parameters"]["original_max_position_embeddings"] == 64

    weights = load(files["model.safetensors"])
    reference = tiny_model("llama").state_dict()
    assert set(weights) <= set(reference) and "model.embed_tokens.weight" in weights
    for key, value in weights.items():
        assert torch.equal(value, reference[key]), key

    card = files["README.md"].decode()
    assert f"base_model: {BASE_REPO}" in card
    assert f"**Base model:** `{BASE_REPO}`" in card
    assert f"**Context length (max_position_embeddings):** {expected_context}" in card
    expected_patch = {
        "yarn": "- **rope**: `type` = 'yarn', `factor` = 4",
        "alibi": "- **alibi**: defaults",
        "memory": "- **memory**: `memory_tokens` = 2, `segment_length` = 8",
    }[name]
    assert expected_patch in card
    if name == "memory":  # the wrapper's own weights travel beside the base model's
        assert "hf_longctx_extra.safetensors" in files
        assert "segments of 8 tokens linked by recurrent memory tokens" in card
    snippet = ast.parse(card.split("```python\n", 1)[1].split("```", 1)[0])  # the card's loading code
    loads = [c for c in ast.walk(snippet) if isinstance(c, ast.Call) and ast.unparse(c.func) == "hf_longctx.from_pretrained"]
    assert [ast.literal_eval(c.args[0]) for c in loads] == [repo_id(name)]

    commit_urls = json.loads((out / "commit_urls.json").read_text())
    head, _ = hub.revision(repo_id(name))
    assert commit_urls[name] == f"{hub.endpoint}/{repo_id(name)}/commit/{head}"


@pytest.mark.parametrize("name", SPECS)
def test_reload_from_hub_gives_identical_logits(pushed, name):
    _, out = pushed
    logits = load_file(str(out / f"{name}.safetensors"))
    assert logits["pushed"].shape == (2, SEQ_LEN, 128)
    assert torch.equal(logits["reloaded"], logits["pushed"])
    if name in NATIVE:
        assert torch.equal(logits["plain"], logits["pushed"])


def test_client_needs_only_served_routes(pushed):
    """Every request hit a served route, and each repo was committed to and its weights downloaded."""
    hub, _ = pushed
    assert hub.unhandled == [], hub.unhandled
    for repo in [BASE_REPO, *map(repo_id, SPECS)]:
        assert ("POST", f"/api/models/{repo}/commit/main") in hub.requests, repo
        downloads = [p for m, p in hub.requests if m == "GET" and p.startswith(f"/{repo}/resolve/")]
        assert any(p.endswith("/model.safetensors") for p in downloads), (repo, downloads)


if __name__ == "__main__":
    _push_and_reload(Path(sys.argv[1]))
