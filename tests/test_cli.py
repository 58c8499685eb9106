"""The hf-longctx commands with small settings, and their one-line errors."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import hf_longctx
from hf_longctx import cli, demo
from hf_longctx.testing import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ascii_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    rng = random.Random(0)
    path.write_text("".join(rng.choice("abcdefgh ij.\n") for _ in range(4000)))
    return path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_presets_lists_every_preset_with_its_description(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    presets = hf_longctx.list_presets()
    assert presets, "no presets shipped"
    lines = out.strip().splitlines()
    assert len(lines) == len(presets)
    for line, (name, description) in zip(lines, presets.items()):
        assert line.split()[0] == name and line.endswith(description)


@pytest.mark.parametrize("command", ["demo", "patch", "eval", "presets"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"hf-longctx {command}" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["preset", "spec"])
def test_patch_writes_a_model_that_loads_patched(capsys, tmp_path, model_dir, how):
    if how == "preset":
        choice = ["--preset", "yarn-4x"]
    else:
        spec = tmp_path / "spec.yaml"
        spec.write_text("rope:\n  type: yarn\n  factor: 4.0\n")
        choice = ["--spec", spec]
    code, out, _ = run(capsys, "patch", model_dir, *choice, "--out", tmp_path / "out")
    assert code == 0 and "rope" in out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 4.0
    loaded = hf_longctx.from_pretrained(tmp_path / "out").eval()
    expected = hf_longctx.patch(tiny_model("llama", seed=0), {"rope": {"type": "yarn", "factor": 4.0}})
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=0)


def test_eval_on_a_local_model_with_presets(capsys, tmp_path, model_dir, ascii_text):
    code, out, _ = run(
        capsys, "eval", model_dir, "--preset", "none,yarn-4x", "--lengths", "32,64,256",
        "--tasks", "perplexity,passkey,streaming", "--data", ascii_text, "--out", tmp_path, "--windows", "2", "--trials", "1",
    )  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    ppl = results["perplexity"]
    assert [(r["method"], r["length"]) for r in ppl] == [(m, n) for m in ("none", "yarn-4x") for n in (32, 64, 256)]
    assert all(r["bits_per_byte"] == pytest.approx(r["bits_per_token"]) for r in ppl)  # bytes as tokens
    # YaRN changes the rotation at every position, so it changes the scores (slightly: a random model).
    assert ppl[2]["nll"] != ppl[5]["nll"]
    passkey = results["passkey"]
    # The prompt alone is longer than 64 bytes: only 256 is evaluated, at the five default depths.
    assert [(r["method"], r["length"]) for r in passkey] == [(m, 256) for m in ("none", "yarn-4x") for _ in range(5)]
    assert all(r["accuracy"] in (0.0, 1.0) and r["trials"] == 1 for r in passkey)
    assert "passkey: lengths below" in out
    streaming = results["streaming"]
    assert [(r["method"], r["length"]) for r in streaming] == [(m, n) for m in ("none", "yarn-4x") for n in (32, 64, 256)]
    assert all(r["perplexity"] > 1 and r["cache_tokens"] <= 4 + 1020 for r in streaming)
    assert "| none |" in out and "| yarn-4x |" in out
    for name in ("perplexity.png", "passkey-none.png", "passkey-yarn-4x.png", "streaming.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["eval", "{tmp}/missing", "--lengths", "1k"], "missing"),
        (["eval", "{model}", "--lengths", "1x,2k"], "bad length '1x'"),
        (["eval", "{model}", "--lengths", "1k", "--tasks", "speed"], "unknown task 'speed'"),
        (["eval", "{model}", "--lengths", "1k", "--preset", "yarn-5x"], "unknown preset 'yarn-5x'"),
        (["eval", "{model}", "--lengths", "64", "--data", "{tmp}/nothing.txt"], "nothing.txt"),
        (["eval", "{model}", "--lengths", "64k", "--data", "{data}", "--windows", "1"], "65536"),
        (["patch", "{model}", "--preset", "nope", "--out", "{tmp}/o"], "unknown preset 'nope'"),
        (["patch", "{model}", "--spec", "{tmp}/absent.yaml", "--out", "{tmp}/o"], "absent.yaml"),
        (["patch", "{tmp}", "--preset", "yarn-4x", "--out", "{tmp}/o"], "no config.json"),
        (["patch", "{tmp}/absent.gguf", "--preset", "yarn-4x", "--out", "{tmp}/o"], "GGUF file '{tmp}/absent.gguf' does not exist"),
        (["eval", "{model}", "--gguf-file", "m.gguf", "--lengths", "1k"], "has no file 'm.gguf'"),
        (["eval", "{data}", "--lengths", "1k"], "is a file, not a model"),
    ],
)
def test_bad_input_gives_one_clear_line(capsys, tmp_path, model_dir, ascii_text, argv, expected):
    argv = [a.format(tmp=tmp_path, model=model_dir, data=ascii_text) for a in argv]
    expected = expected.format(tmp=tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2
    # Progress bars (loading weights) may precede it; the error itself is one line, no traceback.
    errors = [line for line in err.splitlines() if line.startswith("hf-longctx: error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err


def test_console_script_reports_bad_input_in_one_line(tmp_path):
    script = shutil.which("hf-longctx", path=os.path.dirname(sys.executable))
    assert script, "the hf-longctx console script is not installed next to this Python"
    argv = [script, "patch", str(tmp_path / "nowhere"), "--preset", "yarn-4x", "--out", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"hf-longctx: error: model '{tmp_path / 'nowhere'}' is neither an existing folder nor a Hub repo id (owner/name)"
    ]


def test_demo_quick_trains_once_then_uses_the_cache(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, out, _ = run(capsys, "demo", "--tier", "tiny", "--quick", "--out", tmp_path / "first")
    assert code == 0
    rows = json.loads((tmp_path / "first" / "results.json").read_text())
    methods = list(dict.fromkeys(r["method"] for r in rows))
    assert methods[:5] == ["none", "linear", "ntk", "dynamic", "yarn"]
    assert methods[-2:] == ["rope fine-tuned 4x", "yarn 4x fine-tuned 4x"]
    assert {r["length"] for r in rows} == {16, 32, 64}
    assert all(set(r) == {"method", "length", "bits_per_byte"} and r["bits_per_byte"] > 0 for r in rows)
    assert (tmp_path / "first" / "bits_per_byte.png").read_bytes()[:4] == b"\x89PNG"
    assert "| none |" in out
    cached = list((tmp_path / "cache" / "hf_longctx").glob("demo-*/*/model.safetensors"))
    assert len(cached) == 3  # base and the two fine-tunes

    def no_training(*args, **kwargs):
        raise AssertionError("a cached rerun must not train")

    monkeypatch.setattr(demo, "train", no_training)
    code, _, _ = run(capsys, "demo", "--tier", "tiny", "--quick", "--out", tmp_path / "again")
    assert code == 0
    assert json.loads((tmp_path / "again" / "results.json").read_text()) == rows


def test_eval_keeps_the_patches_a_checkpoint_was_saved_with(capsys, tmp_path, ascii_text):
    # A YaRN checkpoint, evaluated with a window spec and then as loaded ('none'): the window must
    # not take the checkpoint's YaRN away from the rows that follow it.
    hf_longctx.save_pretrained(hf_longctx.patch(tiny_model("llama", seed=0), "yarn-4x"), tmp_path / "yarn")
    spec = tmp_path / "window.yaml"
    spec.write_text("attention:\n  sliding_window: 8\n")
    common = ["--lengths", "32,64", "--data", ascii_text, "--windows", "2"]
    assert run(capsys, "eval", tmp_path / "yarn", "--preset", f"{spec},none", *common, "--out", tmp_path / "a")[0] == 0
    assert run(capsys, "eval", tmp_path / "yarn", *common, "--out", tmp_path / "b")[0] == 0
    both = json.loads((tmp_path / "a" / "results.json").read_text())["perplexity"]
    alone = json.loads((tmp_path / "b" / "results.json").read_text())["perplexity"]
    assert [r["nll"] for r in both[2:]] == [r["nll"] for r in alone]
    assert [r["nll"] for r in both[:2]] != [r["nll"] for r in alone]


def test_eval_kernels_run_native_windows_through_the_kernels_with_the_same_scores(capsys, tmp_path, ascii_text,
                                                                                 monkeypatch):
    # Gemma 3 (local layers with a native window of 16): --kernels sends every method's attention through the
    # kernels (self-extend through its own function) and leaves every score where the dense masks put it.
    from hf_longctx.attention import backend

    path = tmp_path / "gemma3"
    tiny_model("gemma3_text", seed=0, sliding_window=16, num_hidden_layers=2,
               layer_types=["sliding_attention", "full_attention"]).save_pretrained(path)
    small = tmp_path / "self-extend.yaml"
    small.write_text("extend:\n  method: self_extend\n  group_size: 4\n  window: 24\n")
    common = ["--preset", f"none,yarn-2x,{small}", "--lengths", "96", "--data", ascii_text, "--windows", "2",
              "--beyond-reach"]
    assert run(capsys, "eval", path, *common, "--out", tmp_path / "dense")[0] == 0
    windows = []
    kernel = backend.kernel_path
    monkeypatch.setattr(backend, "kernel_path", lambda *a, **k: windows.append(k["window"]) or kernel(*a, **k))
    assert run(capsys, "eval", path, *common, "--kernels", "--out", tmp_path / "kernels")[0] == 0
    dense = json.loads((tmp_path / "dense" / "results.json").read_text())["perplexity"]
    kernels = json.loads((tmp_path / "kernels" / "results.json").read_text())["perplexity"]
    assert [r["method"] for r in kernels] == [r["method"] for r in dense] == ["none", "yarn-2x", str(small)]
    assert [r["nll"] for r in kernels] == pytest.approx([r["nll"] for r in dense], rel=1e-5)
    assert len(set(r["nll"] for r in dense)) == 3  # three different methods, not one model three times
    assert 16 in windows and None in windows  # the local layers with their window, the global ones without


def test_eval_needle_writes_heatmaps_effective_lengths_and_resumes(capsys, tmp_path, model_dir):
    argv = ["eval", model_dir, "--preset", "yarn-4x", "--tasks", "needle", "--lengths", "300,400", "--depths", "0,1",
            "--needles", "2", "--out", tmp_path, "--beyond-reach"]  # fmt: skip
    code, out, _ = run(capsys, *argv)
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["needle"]
    # the unpatched model is always evaluated beside the presets, at every length
    assert [(r["method"], r["length"], r["depth"]) for r in rows] == [
        (m, n, d) for m in ("none", "yarn-4x") for n in (300, 400) for d in (0.0, 1.0)]
    assert all(r["needles"] == 2 and r["score"] in (0.0, 50.0, 100.0) and len(r["answers"]) == 2 for r in rows)
    assert results["effective_length"]["threshold"] == 85.6
    assert set(results["effective_length"]["lengths"]) == {"none", "yarn-4x"}
    for name in ("needle-none.png", "needle-yarn-4x.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "Effective length" in out and "| yarn-4x |" in out
    # A rerun takes every finished cell from cells.json: change one there and it shows in the results.
    cells = json.loads((tmp_path / "cells.json").read_text())
    key = next(k for k in cells if k.startswith("needle|") and "|yarn-4x|400|1.0|" in k)
    cells[key]["score"] = 12.5
    (tmp_path / "cells.json").write_text(json.dumps(cells))
    code, _, _ = run(capsys, *argv)
    assert code == 0
    again = json.loads((tmp_path / "results.json").read_text())["needle"]
    assert [r["score"] for r in again] == [12.5 if (r["method"], r["length"], r["depth"]) == ("yarn-4x", 400, 1.0)
                                           else r["score"] for r in rows]  # fmt: skip


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--preset", "yarn-4x", "--tasks", "needle", "--lengths", "1k"],
         "yarn-4x reaches 256 tokens (factor 4 x 64 trained), --lengths asks for 1024"),
        (["--preset", "self-extend-4x", "--tasks", "needle", "--lengths", "300"], "self-extend-4x reaches 64 tokens"),
        (["--tasks", "needle", "--lengths", "1k", "--depths", "0,2"], "bad --depths '0,2'"),
        (["--tasks", "needles", "--lengths", "1k"], "unknown task 'needles'"),
        (["--harness", "niah_single_2", "--lengths", "4k"],
         "harness task 'niah_single_2' needs the network: it downloads the Paul Graham essays"),
        (["--harness", "babilong", "--lengths", "4k"], "harness task 'babilong' needs the network"),
    ],
)
def test_eval_needle_bad_input_gives_one_clear_line(capsys, tmp_path, model_dir, argv, expected):
    code, _, err = run(capsys, "eval", model_dir, "--out", tmp_path, *argv)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("hf-longctx: error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "cells.json").exists()  # refused before any cell ran


def test_eval_passkey_takes_its_depths_and_resumes_point_by_point(capsys, tmp_path, model_dir, monkeypatch):
    from hf_longctx.evaluation import passkey

    argv = ["eval", model_dir, "--preset", "none,yarn-4x", "--tasks", "passkey", "--lengths", "256,300", "--depths",
            "0,1", "--trials", "2", "--out", tmp_path, "--beyond-reach"]  # fmt: skip
    assert run(capsys, *argv)[0] == 0
    rows = json.loads((tmp_path / "results.json").read_text())["passkey"]
    assert [(r["method"], r["length"], r["depth"], r["trials"]) for r in rows] == [
        (m, n, d, 2) for m in ("none", "yarn-4x") for n in (256, 300) for d in (0.0, 1.0)]
    cells = json.loads((tmp_path / "cells.json").read_text())
    assert len([k for k in cells if k.startswith("passkey|")]) == 8  # one cell per point, written as it finished
    # Rerun with one point removed and another edited: only the removed one runs again (its 2 trials).
    removed = next(k for k in cells if "|none|300|1.0|" in k)
    edited = next(k for k in cells if "|yarn-4x|256|0.0|" in k)
    del cells[removed]
    cells[edited]["accuracy"] = 0.25
    (tmp_path / "cells.json").write_text(json.dumps(cells))
    prompts = []
    continuation = passkey.greedy_continuation
    monkeypatch.setattr(passkey, "greedy_continuation", lambda m, ids, **k: prompts.append(ids.shape[1]) or
                        continuation(m, ids, **k))  # fmt: skip
    assert run(capsys, *argv)[0] == 0
    assert len(prompts) == 2
    again = json.loads((tmp_path / "results.json").read_text())["passkey"]
    assert [r["accuracy"] for r in again] == [0.25 if (r["method"], r["length"], r["depth"]) == ("yarn-4x", 256, 0.0)
                                              else r["accuracy"] for r in rows]  # fmt: skip
