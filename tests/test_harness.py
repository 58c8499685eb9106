"""The lm-evaluation-harness bridge: lm-eval's own scores for a patched model, RULER offline, one-line refusals.

A byte-level tokenizer built here and a tiny random Llama: no download. The parity runs RULER's
niah_single_1 at its shortest scored length (4096 tokens) on three samples.
"""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("nltk")
pytest.importorskip("wonderwords")

from hf_longctx import cli, patch  # noqa: E402
from hf_longctx.evaluation import harness  # noqa: E402
from hf_longctx.testing import tiny_model  # noqa: E402

TASK = "niah_single_1"
LENGTH = 4096
LIMIT = 3
YARN_2X = {"rope": {"type": "yarn", "factor": 2.0}}


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A transformers fast tokenizer with one token per byte (257 tokens with the end-of-text one), saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return tokenizer, str(path)


def needle_reader(model, tokenizer):
    """Make ``model.generate`` answer RULER's single needle from the prompt it is given: the number after the
    first "is: " (the needle line), or nothing when the needle is not in the prompt (cut from the left).
    A model that scores 1 exactly when lm-eval hands it the whole prompt."""
    import re

    def generate(input_ids, attention_mask=None, **kwargs):
        rows = []
        for row in input_ids:
            found = re.search(r"is: (\d{7})\.", tokenizer.decode(row.tolist()))
            answer = tokenizer.encode(" " + found.group(1) if found else " none", add_special_tokens=False)
            rows.append(torch.cat([row, torch.tensor(answer, dtype=row.dtype)]))
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)

    model.generate = generate  # instance attribute: this model object only
    return model


def plain_simple_evaluate(model, tokenizer, path, max_length=None, **kwargs):
    """What a user of lm-eval writes by hand for the same model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1,
              **({} if max_length is None else {"max_length": max_length}))  # fmt: skip
    with harness._no_nltk_download():  # only keeps nltk off the network; the task code is lm-eval's
        return lm, simple_evaluate(model=lm, tasks=[TASK], limit=LIMIT, log_samples=True,
                                   metadata={"tokenizer": path, "max_seq_lengths": [LENGTH]}, **kwargs)  # fmt: skip


def test_scores_and_answers_equal_simple_evaluate_on_the_same_hflm(byte_tokenizer):
    tokenizer, path = byte_tokenizer
    model = needle_reader(patch(tiny_model("llama", seed=0, vocab_size=len(tokenizer)), YARN_2X), tokenizer)
    ours = harness.evaluate(model, tokenizer, [TASK], [LENGTH], tokenizer_path=path, limit=LIMIT)
    lm = harness.harness_model(model, tokenizer, max_length=LENGTH + 256)
    _, theirs = plain_simple_evaluate(model, tokenizer, path, max_length=lm.max_length)
    score = harness.task_score(ours, TASK, LENGTH)
    assert score == harness.task_score(theirs, TASK, LENGTH)
    assert ours["results"][TASK] == theirs["results"][TASK]
    assert ours["n-samples"][TASK]["effective"] == LIMIT
    # The reader finds every needle in a whole prompt: the prompts reached the model uncut.
    assert score == 1.0
    answers = [s["filtered_resps"] for s in theirs["samples"][TASK]]
    assert len(answers) == LIMIT and all(a[0].strip().isdigit() for a in answers)


def test_without_max_length_lm_eval_cuts_the_prompt_and_the_score_falls(byte_tokenizer):
    tokenizer, path = byte_tokenizer
    model = needle_reader(tiny_model("llama", seed=0, vocab_size=len(tokenizer)), tokenizer)
    lm, default = plain_simple_evaluate(model, tokenizer, path)
    assert lm.max_length < LENGTH  # lm-eval's own fallback (max_position_embeddings of the tiny model)
    assert harness.task_score(default, TASK, LENGTH) == 0.0  # the needle line was cut away from every prompt
    assert harness.harness_model(model, tokenizer).max_length == model.config.max_position_embeddings
    yarn = patch(tiny_model("llama", seed=0, vocab_size=len(tokenizer)), YARN_2X)
    assert harness.harness_model(yarn, tokenizer).max_length == 2 * model.config.max_position_embeddings


def test_ruler_metadata_names_the_tokenizer_and_lengths():
    assert harness.ruler_metadata("/t", [4096, 8192]) == {"tokenizer": "/t", "max_seq_lengths": [4096, 8192]}


def test_the_ruler_import_does_not_reach_for_nltk_data(monkeypatch):
    import nltk

    def refuse(*args, **kwargs):
        raise AssertionError(f"nltk.download{args} was called")

    monkeypatch.setattr(nltk, "download", refuse)
    with harness._no_nltk_download():
        from lm_eval.tasks.ruler import niah_utils  # noqa: F401
        assert nltk.download is not refuse
    assert nltk.download is refuse  # restored


@pytest.mark.parametrize(
    "tasks, expected",
    [
        (["niah_single_2"], "harness task 'niah_single_2' needs the network: it downloads the Paul Graham essays"),
        (["ruler_qa_squad"], "harness task 'ruler_qa_squad' needs the network: it downloads SQuAD"),
        (["longbench_narrativeqa"], "harness task 'longbench_narrativeqa' needs the network: it downloads the longbench"),
        (["niah_single_9"], "unknown harness task 'niah_single_9'"),
    ],
)
def test_bad_tasks_are_refused_in_one_line(tasks, expected):
    with pytest.raises(ValueError, match="^" + expected.replace("(", r"\(")) as info:
        harness.check_tasks(tasks)
    assert "\n" not in str(info.value)


def test_offline_tasks_and_aliases_are_accepted():
    assert harness.check_tasks(["vt", "cwe", "fwe", "niah_multikey_2"]) == ["ruler_vt", "ruler_cwe", "ruler_fwe",
                                                                            "niah_multikey_2"]  # fmt: skip
    with pytest.raises(ValueError, match="scores only the lengths 4096, 8192"):
        harness.check_lengths(["ruler_vt"], [4096, 3000])


def test_cli_harness_score_equals_simple_evaluate(capsys, tmp_path, byte_tokenizer):
    tokenizer, path = byte_tokenizer
    model_dir = tmp_path / "model"
    tiny_model("llama", seed=1, vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    argv = ["eval", str(model_dir), "--preset", "none,yarn-4x", "--harness", TASK, "--lengths", "4k",
            "--limit", str(LIMIT), "--out", str(tmp_path / "out"), "--beyond-reach"]  # fmt: skip
    assert cli.main(argv) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["harness"]
    assert [(r["method"], r["task"], r["length"]) for r in rows] == [("none", TASK, LENGTH), ("yarn-4x", TASK, LENGTH)]
    model = tiny_model("llama", seed=1, vocab_size=len(tokenizer))
    for row, evaluated in zip(rows, [model, patch(tiny_model("llama", seed=1, vocab_size=len(tokenizer)), "yarn-4x")]):
        lm = harness.harness_model(evaluated, tokenizer, max_length=max(harness.extended_length(evaluated), LENGTH + 256))
        _, theirs = plain_simple_evaluate(evaluated, tokenizer, path, max_length=lm.max_length)
        assert row["score"] == harness.task_score(theirs, TASK, LENGTH) and row["samples"] == LIMIT
    assert "| none niah_single_1 |" in capsys.readouterr().out
