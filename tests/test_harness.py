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

    model.seen_lengths = []

    def generate(input_ids, attention_mask=None, **kwargs):
        rows = []
        for row in input_ids:
            model.seen_lengths.append(len(row))
            found = re.search(r"is: (\d{7})\.", tokenizer.decode(row.tolist()))
            answer = tokenizer.encode(" " + found.group(1) if found else " none", add_special_tokens=False)
            rows.append(torch.cat([row, torch.tensor(answer, dtype=row.dtype)]))
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)

    model.generate = generate  # instance attribute: this model object only
    return model


@pytest.fixture(scope="module")
def default_tasks(byte_tokenizer):
    """lm-eval's default task index with RULER's metadata: what simple_evaluate builds from ``metadata=``
    (built once here: indexing every task file takes a while)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(metadata={"tokenizer": byte_tokenizer[1], "max_seq_lengths": [LENGTH]})


def plain_simple_evaluate(model, tokenizer, tasks, max_length=None):
    """What a user of lm-eval writes by hand for the same model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1,
              **({} if max_length is None else {"max_length": max_length}))  # fmt: skip
    with harness._no_nltk_download():  # only keeps nltk off the network; the task code is lm-eval's
        return lm, simple_evaluate(model=lm, tasks=[TASK], limit=LIMIT, log_samples=True, task_manager=tasks)


def test_scores_and_answers_equal_simple_evaluate_on_the_same_hflm(byte_tokenizer, default_tasks):
    tokenizer, path = byte_tokenizer
    model = needle_reader(patch(tiny_model("llama", seed=0, vocab_size=len(tokenizer)), YARN_2X), tokenizer)
    ours = harness.evaluate(model, tokenizer, [TASK], [LENGTH], tokenizer_path=path, limit=LIMIT)
    lm = harness.harness_model(model, tokenizer, max_length=LENGTH + 256)
    _, theirs = plain_simple_evaluate(model, tokenizer, default_tasks, max_length=lm.max_length)
    score = harness.task_score(ours, TASK, LENGTH)
    assert score == harness.task_score(theirs, TASK, LENGTH)
    assert ours["results"][TASK] == theirs["results"][TASK]
    assert ours["n-samples"][TASK]["effective"] == LIMIT
    # The reader finds every needle in a whole prompt: the prompts reached the model uncut.
    assert score == 1.0
    seen = model.seen_lengths  # ours, then theirs: the same prompts, whole (the next test cuts them to 896)
    assert seen[:LIMIT] == seen[LIMIT:] and min(seen) > 1024 and max(seen) <= LENGTH
    answers = [s["filtered_resps"] for s in theirs["samples"][TASK]]
    assert len(answers) == LIMIT and all(a[0].strip().isdigit() for a in answers)


def test_without_max_length_lm_eval_cuts_the_prompt_from_the_left(byte_tokenizer, default_tasks):
    tokenizer, path = byte_tokenizer
    model = needle_reader(tiny_model("llama", seed=0, vocab_size=len(tokenizer), max_position_embeddings=1024), tokenizer)
    lm, default = plain_simple_evaluate(model, tokenizer, default_tasks)
    assert lm.max_length == 1024  # lm-eval's own fallback: max_position_embeddings
    # every prompt (over 1024 tokens, see the test above) reached the model as its last max_length - 128 tokens
    assert model.seen_lengths == [1024 - 128] * LIMIT
    assert harness.task_score(default, TASK, LENGTH) <= 1.0
    assert harness.harness_model(model, tokenizer).max_length == 1024
    yarn = patch(tiny_model("llama", seed=0, vocab_size=len(tokenizer), max_position_embeddings=1024), YARN_2X)
    assert harness.harness_model(yarn, tokenizer).max_length == 2048  # the extended length, not lm-eval's fallback
    model.seen_lengths.clear()
    ours = harness.evaluate(model, tokenizer, [TASK], [LENGTH], tokenizer_path=path, limit=LIMIT)
    assert min(model.seen_lengths) > 1024  # the whole prompts
    assert harness.task_score(ours, TASK, LENGTH) == 1.0


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


def test_cli_harness_score_equals_simple_evaluate(capsys, tmp_path, byte_tokenizer, default_tasks):
    tokenizer, path = byte_tokenizer
    model_dir = tmp_path / "model"
    tiny_model("llama", seed=1, vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    argv = ["eval", str(model_dir), "--preset", "yarn-4x", "--harness", TASK, "--lengths", "4k", "--limit", "1",
            "--out", str(tmp_path / "out"), "--beyond-reach"]  # fmt: skip
    assert cli.main(argv) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["harness"]
    assert [(r["method"], r["task"], r["length"], r["samples"]) for r in rows] == [("yarn-4x", TASK, LENGTH, 1)]
    evaluated = patch(tiny_model("llama", seed=1, vocab_size=len(tokenizer)), "yarn-4x")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=evaluated, tokenizer=tokenizer, batch_size=1, max_length=LENGTH + 256)
    with harness._no_nltk_download():
        theirs = simple_evaluate(model=lm, tasks=[TASK], limit=1, task_manager=default_tasks)
    assert rows[0]["score"] == harness.task_score(theirs, TASK, LENGTH)
    assert "| yarn-4x niah_single_1 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--harness", "niah_single_1", "--lengths", "3000"], "RULER task 'niah_single_1' scores only the lengths 4096"),
        (["--harness", "no_such_task", "--lengths", "4k"], "unknown harness task 'no_such_task'"),
    ],
)
def test_cli_refuses_bad_harness_input_in_one_line(capsys, tmp_path, argv, expected):
    code = cli.main(["eval", str(tmp_path), "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("hf-longctx: error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err
