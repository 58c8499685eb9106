"""Passkey retrieval (Mohtashami & Jaggi, 2023): find a number hidden in filler text.

The protocol of the authors' test script (landmark-attention, ``llama/run_test.py``): the prompt
is five lines, the task description, filler, the needle "The pass key is NNNNN. Remember it. NNNNN
is the pass key.", more filler, and the question "What is the pass key? The pass key is"; the model
continues it greedily for 10 tokens and a trial counts as retrieved when the first number in that
continuation is the key. Here the prompt, answer included, is exactly ``length`` tokens and the
needle sits at a ``depth`` of the filler (0 = right after the task description, 1 = right before
the question). Each point also reports how many continuations start with exactly the answer's
tokens (``exact``), the stricter reading.

The parts of the prompt are tokenized separately and concatenated, so the length is exact and
the same filler tokens surround the key at every depth.

Prompts of one length and key differ only from the needle on, so with ``share_prefix`` the depths are
run deepest first and a prompt that shares more than half of its tokens with the previous one reuses
that prompt's KV cache, cropped to the common prefix: the same computation as a fresh prompt, with less
of it. Below half it runs fresh: the remaining tokens then attend to the cache through an explicit
mask, which (torch's CPU attention, 16k tokens) costs more than a fresh causal forward saves. It needs
a cache that can be cropped back and keys that do not depend on the rest of the prompt, so it is
refused for RoPE whose frequencies follow the length (dynamic NTK, LongRoPE), native sliding windows,
and hf_longctx sections other than ``rope``.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import asdict, dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from .. import compat
from ..patching import applied_sections
from .streaming import length_or_window_obstacle

logger = logging.getLogger(__name__)

TASK = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"
SEPARATOR = "\n"  # between the five lines of the prompt
NEW_TOKENS = 10  # greedy continuation read for the first number
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class PasskeyPoint:
    length: int  # prompt length in tokens, answer included
    depth: float  # where the key sits in the filler: 0 first, 1 last
    accuracy: float  # fraction of trials retrieved: the first number of the continuation is the key
    trials: int
    exact: float = 0.0  # fraction of trials whose continuation starts with exactly the answer's tokens
    answers: list[str] | None = None  # the first number of each continuation ("" when it has none)

    def to_dict(self) -> dict:
        return asdict(self)


def passkey_prompt(
    tokenizer: Tokenizer, length: int, depth: float, key: str, filler: bool = True
) -> tuple[list[int], int]:
    """Token ids of one trial, exactly ``length`` long, and the number of answer tokens at its end.

    Layout: the lines task, filler before, needle, filler after, question (joined by
    :data:`SEPARATOR`), then the answer; the filler is the repeated :data:`FILLER` cut to fill the
    length, ``round(depth * filler tokens)`` of it before the needle. ``filler=False`` leaves the
    filler out (the shortest possible prompt).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    task, needle, question = encode(TASK), encode(NEEDLE.format(key=key)), encode(QUESTION)
    answer, separator = encode(ANSWER.format(key=key)), encode(SEPARATOR)
    fixed = len(task) + len(needle) + len(question) + len(answer) + 4 * len(separator)
    filler_tokens = length - fixed if filler else 0
    if filler_tokens < 0:
        raise ValueError(f"a passkey prompt needs at least {fixed} tokens with this tokenizer, length {length} is too short")
    unit = encode(FILLER)
    text = (unit * (filler_tokens // len(unit) + 1))[:filler_tokens]
    before = round(depth * filler_tokens)
    ids = task + separator + text[:before] + separator + needle + separator + text[before:] + separator + question
    return ids + answer, len(answer)


@torch.inference_mode()
def greedy_continuation(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int = NEW_TOKENS, cache: DynamicCache | None = None
) -> list[int]:
    """The ``new_tokens`` tokens greedy decoding appends to ``input_ids`` ``[1, L]`` (fewer at an end-of-sequence).

    A transformers model decodes with ``generate`` (its KV cache, and whatever cache a patch gives it; ``cache``:
    a cache that already holds the first tokens of ``input_ids``, which are then not run again); any other causal
    LM (``model(input_ids, logits_to_keep=1).logits``) is run on the whole prefix per token.
    """
    if hasattr(model, "generate") and getattr(model, "generation_config", None) is not None:
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False,
            num_beams=1, temperature=None, top_p=None, top_k=None, **({} if cache is None else {compat.CACHE: cache}),
        )  # fmt: skip
        return output[0, input_ids.shape[1] :].tolist()
    if cache is not None:
        raise ValueError("a cache needs a transformers model (generate)")
    ids = input_ids
    for _ in range(new_tokens):
        token = model(input_ids=ids, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token.to(ids.dtype)], dim=-1)
    return ids[0, input_ids.shape[1] :].tolist()


def prefix_sharing_check(model: nn.Module) -> None:
    """Raise ``ValueError`` saying why prompts cannot share a cropped KV cache on ``model`` (see the module)."""
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if not (hasattr(model, "generate") and getattr(model, "generation_config", None) is not None):
        raise ValueError(f"{kind}: sharing a prefix needs a transformers model (generate and its cache)")
    other = sorted(set(applied_sections(model)) - {"rope"})
    if other:
        raise ValueError(f"{kind}: patched with {other}, whose caches or attention a cropped DynamicCache would not keep")
    obstacle = length_or_window_obstacle(model)
    if obstacle:
        raise ValueError(f"{kind}: {obstacle}; its prompts cannot share a cropped cache")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reuse_prefix(cache: DynamicCache, previous: list[int], prompt: list[int]) -> None:
    """Crop ``cache``, the KV of ``previous``, to what ``prompt`` can reuse of it (see the module).

    It keeps the common prefix when that is more than half of ``prompt`` (else nothing), and one
    token of ``prompt`` at least stays new, so that its forward has a logit to continue from.
    """
    keep = min(_common_prefix(previous, prompt), len(prompt) - 1)
    drop = cache.get_seq_length() - (keep if 2 * keep > len(prompt) else 0)
    if drop > 0:
        cache.crop(-drop)  # a negative count removes that many tokens (every transformers 5)


def first_number(text: str) -> str:
    """The first run of digits in ``text`` ("" when there is none): the answer the protocol reads."""
    match = re.search(r"\d+", text)
    return match.group() if match else ""


def passkey_keys(trials: int, seed: int = 0) -> list[str]:
    """The random 5-digit keys of ``trials`` trials, from ``random.Random(seed)``: every model sees the same."""
    rng = random.Random(seed)
    return [str(rng.randint(10000, 99999)) for _ in range(trials)]


def min_passkey_length(tokenizer: Tokenizer, keys: Sequence[str]) -> int:
    """The shortest length whose prompts hold every key (task, needle, question and answer, no filler)."""
    return max(len(passkey_prompt(tokenizer, 10**9, 0.0, key, filler=False)[0]) for key in keys)


@torch.inference_mode()
def passkey_accuracy(
    model: nn.Module,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    *,
    trials: int = 5,
    seed: int = 0,
    share_prefix: bool | None = False,
    done: Callable[[int, float], PasskeyPoint | None] | None = None,
    on_point: Callable[[PasskeyPoint], None] | None = None,
    desc: str = "passkey",
) -> list[PasskeyPoint]:
    """Retrieval accuracy at every (length, depth), over ``trials`` random 5-digit keys each; lengths
    outer, depths inner, in the order given.

    The keys are :func:`passkey_keys`, so every model sees the same trials. ``length`` counts the
    prompt and the answer (the model reads ``length - answer tokens`` and continues greedily for
    :data:`NEW_TOKENS` tokens). Raises ``ValueError`` for a length below :func:`min_passkey_length`.
    ``share_prefix``: reuse the KV cache of the common prefix across depths (see the module);
    ``None``: share when :func:`prefix_sharing_check` allows it; ``True``: raise when it does not.
    ``done(length, depth)`` returns a point computed before (not run again: resuming an interrupted
    run); ``on_point`` receives every new point as soon as its last trial is scored (to save it).
    """
    if share_prefix is not False:
        try:
            prefix_sharing_check(model)
            share_prefix = True
        except ValueError:
            if share_prefix:
                raise
            share_prefix = False
    keys = passkey_keys(trials, seed)
    device = next(model.parameters()).device
    points: dict[tuple[int, float], PasskeyPoint] = {}
    for length in lengths:
        for depth in depths:
            previous_point = done(int(length), float(depth)) if done is not None else None
            if previous_point is not None:
                points[(int(length), float(depth))] = previous_point
    todo = [float(d) for d in depths]
    # deepest first: the longest prefixes
    order = sorted(todo, reverse=True) if share_prefix else todo
    runs: dict[tuple[int, float], list[tuple[list[int], list[int]]]] = {}  # (length, depth): (continuation, answer)
    with tqdm(total=(len(lengths) * len(depths) - len(points)) * trials, desc=desc, unit="trial", leave=False) as bar:
        for length in lengths:
            length = int(length)
            for number, key in enumerate(keys):
                cache, previous = (DynamicCache() if share_prefix else None), []
                for depth in order:
                    if (length, depth) in points:
                        continue
                    ids, answer_tokens = passkey_prompt(tokenizer, length, depth, key)
                    prompt, answer = ids[:-answer_tokens], ids[-answer_tokens:]
                    if cache is not None:
                        reuse_prefix(cache, previous, prompt)
                        previous = prompt
                    continuation = greedy_continuation(model, torch.tensor([prompt], device=device), cache=cache)
                    runs.setdefault((length, depth), []).append((continuation, answer))
                    bar.update(1)
                    if number == len(keys) - 1:  # this point's last trial
                        point = _passkey_point(tokenizer, length, depth, keys, runs.pop((length, depth)))
                        logger.info("%s: length %d depth %.2f accuracy %.2f (answers %s)", desc, length, depth,
                                    point.accuracy, point.answers)  # fmt: skip
                        points[(length, depth)] = point
                        if on_point is not None:
                            on_point(point)
    return [points[(int(n), float(d))] for n in lengths for d in depths]


def _passkey_point(tokenizer: Tokenizer, length: int, depth: float, keys: list[str], done) -> PasskeyPoint:
    """The point of ``done``: (continuation, answer tokens) of each trial, in the order of ``keys``."""
    answers = [first_number(tokenizer.decode(continuation)) for continuation, _ in done]
    hits = sum(answer == key for answer, key in zip(answers, keys))
    exact = sum(continuation[: len(answer)] == answer for continuation, answer in done)
    trials = len(keys)
    return PasskeyPoint(length=length, depth=depth, accuracy=hits / trials, trials=trials, exact=exact / trials,
                        answers=answers)
