"""Evaluation functions against hand-computed values (stub models with known logits) and transformers' loss."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_longctx.demo import ByteTokenizer
from hf_longctx.evaluation import (
    format_length,
    first_number,
    greedy_continuation,
    markdown_table,
    passkey_accuracy,
    passkey_keys,
    passkey_prompt,
    perplexity_vs_length,
    plot_lines,
    plot_passkey,
    window_ends,
)
from hf_longctx.evaluation.passkey import NEEDLE, QUESTION, TASK
from hf_longctx.testing import tiny_model

VOCAB = 16


class StubLM(nn.Module):
    """Logits from a rule, for hand-computable scores.

    ``rule(ids, t) -> [V] logits`` for position ``t`` of one row ``ids``; only the positions kept
    by ``logits_to_keep`` are computed. Records every input it sees.
    """

    def __init__(self, rule):
        super().__init__()
        self.rule = rule
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the evaluation a device
        self.inputs = []

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        self.inputs.append(input_ids.clone())
        length = input_ids.shape[1]
        first = length - logits_to_keep if logits_to_keep else 0
        logits = torch.stack(
            [torch.stack([self.rule(row.tolist(), t) for t in range(first, length)]) for row in input_ids]
        )
        return SimpleNamespace(logits=logits)


def half_on_successor(ids, t, warmup=0):
    """p(ids[t] + 1 mod V) = 1/2, the rest uniform; uniform over all V before position ``warmup``."""
    if t < warmup:
        return torch.zeros(VOCAB)
    logits = torch.full((VOCAB,), 0.0)
    # softmax: e^a / (e^a + (V - 1)) = 1/2  <=>  e^a = V - 1
    logits[(ids[t] + 1) % VOCAB] = math.log(VOCAB - 1)
    return logits


def test_window_ends_spread_evenly_and_leave_room():
    assert window_ends(100, 20, 5) == [20, 40, 60, 80, 100]
    assert window_ends(50, 50, 1) == [50]
    with pytest.raises(ValueError, match="49 tokens"):
        window_ends(49, 50, 1)
    with pytest.raises(ValueError, match="at most 3 distinct windows"):
        window_ends(52, 50, 4)


def test_perplexity_of_a_known_distribution():
    # Every next token is its predecessor + 1, which the stub gives probability 1/2: nll = ln 2.
    tokens = torch.arange(200) % VOCAB
    points = perplexity_vs_length(StubLM(half_on_successor), tokens, [8, 32], num_windows=3, token_bytes=lambda ids: 2 * len(ids))
    for point, length in zip(points, [8, 32]):
        assert point.length == length and point.windows == 3 and point.scored_tokens == 7
        assert point.nll == pytest.approx(math.log(2), rel=1e-6)
        assert point.perplexity == pytest.approx(2.0, rel=1e-6)
        assert point.bits_per_token == pytest.approx(1.0, rel=1e-6)
        assert point.bits_per_byte == pytest.approx(0.5, rel=1e-6)  # two bytes per token


def test_every_length_scores_the_same_final_tokens():
    # Uniform before position 8 of the window, 1/2 on the right token from there: at length 4
    # all three scored predictions are uniform (nll ln 16), at length 16 none are (nll ln 2).
    stub = StubLM(lambda ids, t: half_on_successor(ids, t, warmup=8))
    tokens = torch.arange(100) % VOCAB
    short, long = perplexity_vs_length(stub, tokens, [4, 16], num_windows=2, score_tokens=3, batch_size=1)
    assert short.nll == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert long.nll == pytest.approx(math.log(2), rel=1e-6)
    seen = [ids[0] for ids in stub.inputs]
    assert [len(s) for s in seen] == [4, 4, 16, 16]
    assert torch.equal(seen[0][-3:], seen[2][-3:]) and torch.equal(seen[1][-3:], seen[3][-3:])
    assert torch.equal(seen[1], tokens[96:100])  # the last window ends at the end of the text


def test_perplexity_matches_transformers_loss():
    model = tiny_model("llama", seed=1)
    tokens = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0))
    (point,) = perplexity_vs_length(model, tokens, [40], num_windows=3, score_tokens=10)
    losses = []
    for end in window_ends(300, 40, 3):
        ids = tokens[end - 40 : end][None]
        labels = ids.clone()
        labels[:, :-10] = -100
        losses.append(model(input_ids=ids, labels=labels).loss.item())
    assert point.nll == pytest.approx(sum(losses) / 3, rel=1e-5)


def test_bad_lengths_and_score_tokens_are_refused():
    stub = StubLM(half_on_successor)
    with pytest.raises(ValueError, match="score_tokens"):
        perplexity_vs_length(stub, torch.arange(100) % VOCAB, [8, 16], score_tokens=8)
    with pytest.raises(ValueError, match=">= 2"):
        perplexity_vs_length(stub, torch.arange(100) % VOCAB, [1])


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_the_exact_length_and_places_the_key(depth):
    tokenizer = ByteTokenizer()
    ids, answer_tokens = passkey_prompt(tokenizer, 400, depth, "12345")
    text = bytes(ids).decode()
    assert len(ids) == 400 and answer_tokens == len(" 12345")
    assert text.startswith(TASK + "\n") and text.endswith("\n" + QUESTION + " 12345")
    needle_at = text.index("\n" + NEEDLE.format(key="12345") + "\n") + 1
    filler = 400 - len(TASK) - len(NEEDLE.format(key="12345")) - len(QUESTION) - answer_tokens - 4
    assert needle_at - len(TASK) - 2 == round(depth * filler)  # two separators before the needle
    assert text.count("\n") == 4
    with pytest.raises(ValueError, match="length 100 is too short"):
        passkey_prompt(tokenizer, 100, depth, "12345")


def test_first_number_reads_the_first_run_of_digits():
    assert first_number(" the pass key. 60494. 6") == "60494"
    assert first_number(" 123\n456") == "123"
    assert first_number(" the pass key is") == ""


class NoGenerate(nn.Module):
    """A model without ``generate``: greedy_continuation runs it on the whole prefix per token."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, logits_to_keep=0):
        return self.inner(input_ids=input_ids, logits_to_keep=logits_to_keep, use_cache=False)


def test_greedy_continuation_is_what_generate_and_the_argmax_loop_both_give():
    torch.manual_seed(0)
    model = tiny_model().eval()
    prompt = torch.randint(3, model.config.vocab_size, (1, 12))
    by_generate = greedy_continuation(model, prompt, new_tokens=6)
    assert len(by_generate) == 6
    assert greedy_continuation(NoGenerate(model), prompt, new_tokens=6) == by_generate
    # the loop is greedy: each token is the argmax after the prefix and the tokens before it
    ids = prompt
    for token in by_generate:
        assert model(ids).logits[0, -1].argmax().item() == token
        ids = torch.cat([ids, torch.tensor([[token]])], dim=-1)


def lookback_copier(window: int, n: int = 8):
    """Predicts the token that followed the latest earlier occurrence of the last ``n`` tokens,
    searching only the last ``window`` positions (token 0 when there is none): retrieves the key
    exactly when the needle lies within ``window`` tokens."""

    def rule(ids, t):
        logits = torch.zeros(256)
        context = ids[t - n + 1 : t + 1]
        for start in range(t - n, max(t - window, 0) - 1, -1):
            if ids[start : start + n] == context:
                logits[ids[start + n]] = 1.0
                return logits
        logits[0] = 1.0
        return logits

    return rule


def test_passkey_accuracy_follows_what_the_model_can_see():
    # Prompt of 700 bytes; the copier looks back 250 bytes. The needle (~60 bytes) at depth 1 ends
    # just before the ~37-byte question: in reach. At depth 0 it starts ~130 bytes in: out of reach.
    model = StubLM(lookback_copier(window=250))
    points = passkey_accuracy(model, ByteTokenizer(), [700], depths=[0.0, 1.0], trials=3)
    assert [(p.length, p.depth, p.accuracy, p.exact, p.trials) for p in points] == [
        (700, 0.0, 0.0, 0.0, 3), (700, 1.0, 1.0, 1.0, 3)]
    assert points[1].answers == passkey_keys(3) and points[0].answers == ["", "", ""]
    blind = StubLM(lookback_copier(window=10))
    assert [p.accuracy for p in passkey_accuracy(blind, ByteTokenizer(), [700], depths=[1.0], trials=2)] == [0.0]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_shared_prefix_continues_every_prompt_as_a_fresh_run(model_type, monkeypatch):
    from hf_longctx import patch
    from hf_longctx.evaluation import passkey

    model = patch(tiny_model(model_type, seed=3), {"rope": {"type": "yarn", "factor": 2}})
    calls = []
    real = passkey.greedy_continuation

    def recording(model, input_ids, new_tokens=passkey.NEW_TOKENS, cache=None):
        cached = 0 if cache is None else cache.get_seq_length()
        continuation = real(model, input_ids, new_tokens, cache=cache)
        calls.append((input_ids, cached, continuation))
        if cache is not None:  # the cache now holds the prompt's keys and values as a fresh forward computes them
            fresh = model(input_ids, use_cache=True).past_key_values
            length = input_ids.shape[1]
            for got, expected in zip(cache.layers, fresh.layers, strict=True):
                torch.testing.assert_close(got.keys[:, :, :length], expected.keys, rtol=0, atol=1e-5)
                torch.testing.assert_close(got.values[:, :, :length], expected.values, rtol=0, atol=1e-5)
        return continuation

    monkeypatch.setattr(passkey, "greedy_continuation", recording)
    depths = [0.0, 0.5, 0.75, 1.0]  # 300 bytes: the prompt before the needle is 134 bytes, the filler 62
    shared = passkey_accuracy(model, ByteTokenizer(), [300], depths, trials=2, share_prefix=True)
    assert len(calls) == 8
    # deepest first; a depth sharing more than half of its prompt with the one before starts from its cache cropped
    # to the common prefix (0.75 and 0.5), the others run fresh (1 and 0)
    assert [cached for _, cached, _ in calls] == [0, 134 + 46, 134 + 31, 0] * 2
    for input_ids, cached, continuation in calls:
        assert continuation == real(model, input_ids)  # what a fresh generate gives
    calls.clear()
    fresh = passkey_accuracy(model, ByteTokenizer(), [300], depths, trials=2)
    assert all(cached == 0 for _, cached, _ in calls)
    assert [(p.depth, p.answers, p.exact) for p in shared] == [(p.depth, p.answers, p.exact) for p in fresh]


def test_prefix_sharing_is_refused_where_a_prefix_is_not_reusable():
    from hf_longctx import patch
    from hf_longctx.evaluation.passkey import prefix_sharing_check

    prefix_sharing_check(patch(tiny_model("llama"), {"rope": {"type": "linear", "factor": 2}}))  # allowed
    with pytest.raises(ValueError, match="changes its frequencies"):
        prefix_sharing_check(patch(tiny_model("llama"), {"rope": {"type": "dynamic", "factor": 2}}))
    with pytest.raises(ValueError, match="native sliding window"):
        prefix_sharing_check(tiny_model("mistral", sliding_window=8))
    with pytest.raises(ValueError, match="patched with \\['attention'\\]"):
        prefix_sharing_check(patch(tiny_model("llama"), {"attention": {"sliding_window": 8}}))
    with pytest.raises(ValueError, match="transformers model"):
        prefix_sharing_check(StubLM(lookback_copier(window=10)))
    # share_prefix=None falls back to fresh prompts; True raises
    dynamic = patch(tiny_model("llama"), {"rope": {"type": "dynamic", "factor": 2}})
    assert len(passkey_accuracy(dynamic, ByteTokenizer(), [300], [0.0], trials=1, share_prefix=None)) == 1
    with pytest.raises(ValueError, match="changes its frequencies"):
        passkey_accuracy(dynamic, ByteTokenizer(), [300], [0.0], trials=1, share_prefix=True)


def test_markdown_table_pivots_rows():
    rows = [
        {"method": "none", "length": 512, "bpb": 1.0},
        {"method": "none", "length": 1024, "bpb": 2.5},
        {"method": "yarn", "length": 512, "bpb": 1.25},
    ]
    assert markdown_table(rows, "bpb", fmt="{:.2f}") == (
        "| method | 512 | 1k |\n|---|---|---|\n| none | 1.00 | 2.50 |\n| yarn | 1.25 |  |"
    )
    assert [format_length(n) for n in (100, 1024, 1536, 32768)] == ["100", "1k", "1.5k", "32k"]


def test_plots_are_png_files(tmp_path):
    rows = [{"method": m, "length": n, "bits_per_byte": v} for m, v in (("a", 1.0), ("b", 2.0)) for n in (128, 256)]
    line = plot_lines(rows, tmp_path / "line.png", "bits_per_byte", reference_x=128)
    heat = plot_passkey(
        [{"length": n, "depth": d, "accuracy": d} for n in (128, 256) for d in (0.0, 1.0)], tmp_path / "heat.png"
    )
    for path in (line, heat):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
