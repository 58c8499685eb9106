"""hf_longctx.compat: each name it gives is the one the installed transformers uses.

CI runs this file on the newest and on the lowest supported transformers: a wrong cache name
is silently swallowed by a model's ``**kwargs`` (the model then runs without the given cache)
or rejected by ``generate``, and a wrong TrainingArguments name is rejected by the parser.
"""

import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tokens
from transformers import DynamicCache

from hf_longctx import compat
from hf_longctx.compat import CACHE, cache_of
from hf_longctx.testing import tiny_model
from hf_longctx.training import parse_args

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes/configs/tiny.yaml"


def test_forward_uses_and_returns_the_cache_given_under_its_name():
    model = tiny_model("llama")
    ids = tokens(1, 9)
    cache = DynamicCache()
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True, **{CACHE: cache})
        assert cache_of(prefix) is cache and cache.get_seq_length() == 8
        step = model(ids[:, -1:], use_cache=True, **{CACHE: cache_of(prefix)}).logits[:, -1]
    assert cache.get_seq_length() == 9
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


def test_generate_decodes_into_the_cache_given_under_its_name():
    model = tiny_model("qwen2")
    ids = tokens(1, 6)
    cache = DynamicCache()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, **{CACHE: cache})
        plain = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert cache_of(out) is cache
    assert cache.get_seq_length() == 6 + 5 - 1  # the last generated token is never fed back
    assert torch.equal(out.sequences, plain)


def test_cache_of_an_output_without_a_cache_is_none():
    with torch.no_grad():
        out = tiny_model("llama")(tokens(1, 4), use_cache=False)
    assert cache_of(out) is None


@pytest.mark.parametrize("where", ["config", "argument", "argument="])
def test_activation_checkpointing_reaches_training_arguments(tmp_path, where):
    """Recipe configs and command lines say ``activation_checkpointing`` on every supported release."""
    config = yaml.safe_load(TINY.read_text())
    argv = ["--output_dir", str(tmp_path)]
    if where == "config":
        config["activation_checkpointing"] = True
    elif where == "argument":
        argv += ["--activation_checkpointing", "true"]
    else:
        argv += ["--activation_checkpointing=true"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    training_args = parse_args(["--config", str(path), *argv])[3]
    assert getattr(training_args, compat.ACTIVATION_CHECKPOINTING) is True
    default = parse_args(["--config", str(TINY), "--output_dir", str(tmp_path)])[3]
    assert getattr(default, compat.ACTIVATION_CHECKPOINTING) is False


def test_training_argv_renames_only_option_names():
    argv = ["--output_dir", "activation_checkpointing", "--learning_rate=1e-4", "--activation_checkpointing", "true"]
    name = compat.ACTIVATION_CHECKPOINTING
    assert compat.training_argv(argv) == [
        "--output_dir", "activation_checkpointing", "--learning_rate=1e-4", f"--{name}", "true"
    ]
    assert compat.training_argv(["--activation_checkpointing=false"]) == [f"--{name}=false"]


def test_docs_state_the_declared_bounds():
    """The docs' versions section (docs/versions.md) and pyproject's dependencies name the same lowest releases."""
    pyproject = (REPO / "pyproject.toml").read_text()
    versions = (REPO / "docs" / "versions.md").read_text()
    for package in ("transformers", "torch"):
        low = re.search(rf'"{package}>=([0-9.]+)', pyproject).group(1)
        assert f"{package} >= {low}" in versions, (package, low)
