"""Needle in a haystack: a grid of context lengths x needle depths, scored by exact match.

Every prompt is exactly ``length`` tokens, answer included: a task line, the haystack (English prose:
the Python documentation's topic help, ``pydoc_data.topics``, shipped with Python, so nothing is
downloaded), a needle line "The special magic number for WORD is NNNNNNN." at ``depth`` of the
haystack (0 = right after the task line, 1 = right before the question), and the question "What is
the special magic number for WORD? The special magic number for WORD is". The model continues
greedily; a needle counts as found when the first number of the continuation is exactly its
7-digit value (no judge model). Each cell holds several needles (other words, other values, the same
place), and its score is the percentage found.

The **effective length** of a method is the longest length at which the mean score over depths, at
that length and at every shorter length of the grid, is at least a threshold (85.6 by default: the
score of Llama-2-7B at 4k that RULER takes as its bar). None when even the shortest length falls
below it.

A cell's prompts differ only from the needle on, and prompts with the same depth differ only in the
needle's words, so for models whose prompts can share a cropped KV cache
(:func:`~hf_longctx.evaluation.passkey.prefix_sharing_check`) a cell reuses what the previous
prompt computed, exactly as the passkey does (deepest first, more than half shared).
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..patching import applied_sections
from .passkey import Tokenizer, first_number, greedy_continuation, prefix_sharing_check, reuse_prefix

logger = logging.getLogger(__name__)

TASK = "A special magic number is hidden in the text below. Remember it: you will be asked for it at the end."
NEEDLE = "The special magic number for {word} is {value}."
QUESTION = "What is the special magic number for {word}? The special magic number for {word} is"
ANSWER = " {value}"
SEPARATOR = "\n"
NEW_TOKENS = 12  # greedy continuation read for the first number (7 digits in any tokenizer)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_THRESHOLD = 85.6
WORDS = (
    "amber-falcon", "silent-harbor", "copper-meadow", "frozen-lantern", "velvet-canyon", "hollow-comet",
    "crimson-orchard", "distant-glacier", "golden-thicket", "hidden-quarry", "lunar-tapestry", "marble-heron",
    "northern-ember", "quiet-monsoon", "rusty-compass", "scarlet-lagoon", "tidal-pavilion", "wild-juniper",
)


@dataclass(frozen=True)
class Needle:
    word: str
    value: str


@dataclass
class NeedleCell:
    length: int  # prompt length in tokens, answer included
    depth: float  # where the needle sits in the haystack: 0 first, 1 last
    score: float  # percentage of needles found (first number of the continuation == value)
    needles: int
    exact: float = 0.0  # percentage whose continuation starts with exactly the answer's tokens
    answers: list[str] = field(default_factory=list)  # first number of each continuation ("" when none)
    values: list[str] = field(default_factory=list)  # the needles' values, in the same order

    def to_dict(self) -> dict:
        return asdict(self)


def make_needles(count: int, seed: int = 0) -> list[Needle]:
    """``count`` needles with distinct words and random 7-digit values from ``random.Random(seed)``."""
    if not 1 <= count <= len(WORDS):
        raise ValueError(f"needles per cell must be in [1, {len(WORDS)}], got {count}")
    rng = random.Random(seed)
    words = rng.sample(WORDS, count)
    return [Needle(word, str(rng.randint(1_000_000, 9_999_999))) for word in words]


def haystack_text() -> str:
    """The default haystack: Python's documentation topics, sorted by topic, as one text (ASCII only:
    the few other characters are dropped, so that byte-level tokenizers of 128 symbols read it too)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)).encode("ascii", "ignore").decode("ascii")


def haystack_tokens(tokenizer: Tokenizer, text: str | None = None) -> list[int]:
    return list(tokenizer.encode(haystack_text() if text is None else text, add_special_tokens=False))


def _pieces(tokenizer: Tokenizer, needle: Needle) -> dict[str, list[int]]:
    """The token ids of every part of a prompt but the haystack."""

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    return {"task": encode(TASK), "separator": encode(SEPARATOR),
            "line": encode(NEEDLE.format(word=needle.word, value=needle.value)),
            "question": encode(QUESTION.format(word=needle.word)), "answer": encode(ANSWER.format(value=needle.value))}  # fmt: skip


def _fixed(pieces: dict[str, list[int]]) -> int:
    return sum(len(v) for v in pieces.values()) + 3 * len(pieces["separator"])  # four separators in all


def needle_prompt(
    tokenizer: Tokenizer, haystack: Sequence[int], length: int, depth: float, needle: Needle
) -> tuple[list[int], int]:
    """Token ids of one prompt, exactly ``length`` long, and the number of answer tokens at its end.

    The haystack (token ids; repeated when shorter than needed) is cut to fill the length,
    ``round(depth * haystack tokens)`` of it before the needle line.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not haystack:
        raise ValueError("the haystack is empty")
    p = _pieces(tokenizer, needle)
    hay = length - _fixed(p)
    if hay < 0:
        raise ValueError(f"a needle prompt needs at least {_fixed(p)} tokens with this tokenizer, length {length} is too short")
    text = (list(haystack) * (hay // len(haystack) + 1))[:hay]
    before = round(depth * hay)
    sep = p["separator"]
    ids = p["task"] + sep + text[:before] + sep + p["line"] + sep + text[before:] + sep + p["question"]
    return ids + p["answer"], len(p["answer"])


def min_needle_length(tokenizer: Tokenizer, needles: Sequence[Needle]) -> int:
    """The shortest length whose prompts hold every needle (no haystack at all)."""
    return max(_fixed(_pieces(tokenizer, n)) for n in needles)


@torch.inference_mode()
def needle_grid(
    model: nn.Module,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    *,
    needles: int = 3,
    seed: int = 0,
    haystack: Sequence[int] | None = None,
    share_prefix: bool | None = None,
    done: Callable[[int, float], NeedleCell | None] | None = None,
    on_cell: Callable[[NeedleCell], None] | None = None,
    desc: str = "needle",
) -> list[NeedleCell]:
    """One :class:`NeedleCell` per (length, depth), lengths outer, in the order given.

    ``done(length, depth)`` returns a cell computed before (it is not run again; resuming an
    interrupted grid); ``on_cell`` receives every new cell as soon as it is scored (to save it).
    ``share_prefix``: reuse the KV cache of a common prefix (see the module); ``None`` shares when the
    model allows it, ``True`` raises when it does not.
    """
    if share_prefix is not False:
        try:
            prefix_sharing_check(model)
            share_prefix = True
        except ValueError:
            if share_prefix:
                raise
            share_prefix = False
    items = make_needles(needles, seed)
    hay = list(haystack) if haystack is not None else haystack_tokens(tokenizer)
    device = next(model.parameters()).device
    cells: dict[tuple[int, float], NeedleCell] = {}
    todo = []
    for length in lengths:
        for depth in depths:
            previous = done(int(length), float(depth)) if done is not None else None
            if previous is not None:
                cells[(int(length), float(depth))] = previous
            else:
                todo.append((int(length), float(depth)))
    with tqdm(total=len(todo) * len(items), desc=desc, unit="prompt", leave=False) as bar:
        for length in dict.fromkeys(n for n, _ in todo):
            cache, previous_ids = (DynamicCache() if share_prefix else None), []
            # deepest first: the longest common prefixes
            for depth in sorted((d for n, d in todo if n == length), reverse=share_prefix):
                continuations, answers_ids = [], []
                for needle in items:
                    ids, answer_tokens = needle_prompt(tokenizer, hay, length, depth, needle)
                    prompt, answer = ids[:-answer_tokens], ids[-answer_tokens:]
                    if cache is not None:
                        reuse_prefix(cache, previous_ids, prompt)
                        previous_ids = prompt
                    continuation = greedy_continuation(
                        model, torch.tensor([prompt], device=device), new_tokens=NEW_TOKENS, cache=cache
                    )
                    continuations.append(continuation)
                    answers_ids.append(answer)
                    bar.update(1)
                answers = [first_number(tokenizer.decode(c)) for c in continuations]
                found = sum(a == n.value for a, n in zip(answers, items))
                exact = sum(c[: len(a)] == a for c, a in zip(continuations, answers_ids))
                cell = NeedleCell(length=length, depth=depth, score=100.0 * found / len(items), needles=len(items),
                                  exact=100.0 * exact / len(items), answers=answers, values=[n.value for n in items])
                cells[(length, depth)] = cell
                logger.info("%s: length %d depth %.2f score %.1f (answers %s)", desc, length, depth, cell.score, answers)
                if on_cell is not None:
                    on_cell(cell)
    return [cells[(int(n), float(d))] for n in lengths for d in depths]


def mean_scores(rows: Sequence[dict]) -> dict[int, float]:
    """Length -> mean score over the depths of ``rows`` (dicts or cells with ``length`` and ``score``)."""
    groups: dict[int, list[float]] = {}
    for r in rows:
        r = r if isinstance(r, dict) else r.to_dict()
        groups.setdefault(int(r["length"]), []).append(float(r["score"]))
    return {n: sum(v) / len(v) for n, v in sorted(groups.items())}


def effective_length(rows: Sequence[dict], threshold: float = DEFAULT_THRESHOLD) -> int | None:
    """The longest length whose mean score, and that of every shorter length, is >= ``threshold``.

    None when the shortest length already falls below it (see the module).
    """
    best = None
    for length, score in mean_scores(rows).items():
        if score < threshold:
            break
        best = length
    return best


def reach(model: nn.Module) -> tuple[int | None, str]:
    """The longest input a method keeps every relative position inside the trained range, and how.

    ``(None, why)`` when no length is too long for it: dynamic NTK rescales to the length it sees,
    dual chunk attention never shows a position above its chunk size. The unpatched model reaches its
    trained length (``max_position_embeddings``); a RoPE scaling reaches its ``max_position_embeddings``
    after the patch (factor x the trained length); Self-Extend with group G and window W reaches
    ``(trained - W) * G + W`` (the trained length when W is not below it).
    """
    from ..positions.rope import original_length

    config = model.config.get_text_config(decoder=True)
    sections = applied_sections(model)
    current = int(config.max_position_embeddings)
    extend = sections.get("extend")
    if extend:
        if extend.get("method") == "dual_chunk":
            return None, f"dual chunk attention shows no position above its chunk size {extend['chunk_size']}"
        group, window = int(extend["group_size"]), int(extend["window"])
        trained = current
        if window >= trained:  # the exact window alone covers the trained length; past it, positions grow
            return trained, f"its window {window} covers the {trained} trained positions and no more"
        return (trained - window) * group + window, f"({trained} trained - {window} window) x {group} + {window}"
    rope = sections.get("rope")
    if rope:
        if rope.get("type") == "dynamic":
            return None, "dynamic NTK rescales its frequencies to the length it sees"
        base = original_length(config)
        return current, f"factor {current / base:g} x {base} trained"
    return current, "its trained length (max_position_embeddings)"
