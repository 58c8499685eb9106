"""Passkey retrieval (Mohtashami & Jaggi): find a number hidden in filler text.

A prompt of exactly ``length`` tokens holds filler text with one sentence "The pass key is
NNNNN. Remember it. NNNNN is the pass key." placed at a ``depth`` (0 = right after the task
description, 1 = just before the question) and ends with the question and the answer. A trial
counts as retrieved when greedy decoding after the question would produce the answer's tokens
exactly; that is checked in one forward pass (teacher forcing: the argmax at each answer
position must be the next answer token, which is what greedy decoding would emit).

The parts of the prompt are tokenized separately and concatenated, so the length is exact and
the same filler tokens surround the key at every depth.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TASK = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class PasskeyPoint:
    length: int  # prompt length in tokens, answer included
    depth: float  # where the key sits in the filler: 0 first, 1 last
    accuracy: float  # fraction of trials retrieved
    trials: int

    def to_dict(self) -> dict:
        return asdict(self)


def passkey_prompt(
    tokenizer: Tokenizer, length: int, depth: float, key: str, filler: bool = True
) -> tuple[list[int], int]:
    """Token ids of one trial, exactly ``length`` long, and the number of answer tokens at its end.

    Layout: task, filler before, needle, filler after, question, answer; the filler is the
    repeated :data:`FILLER` cut to fill the length, ``round(depth * filler tokens)`` of it before
    the needle. ``filler=False`` leaves the filler out (the shortest possible prompt).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    task, needle, question = encode(TASK), encode(NEEDLE.format(key=key)), encode(QUESTION)
    answer = encode(ANSWER.format(key=key))
    fixed = len(task) + len(needle) + len(question) + len(answer)
    filler_tokens = length - fixed if filler else 0
    if filler_tokens < 0:
        raise ValueError(f"a passkey prompt needs at least {fixed} tokens with this tokenizer, length {length} is too short")
    unit = encode(FILLER)
    text = (unit * (filler_tokens // len(unit) + 1))[:filler_tokens]
    before = round(depth * filler_tokens)
    ids = task + text[:before] + needle + text[before:] + question + answer
    return ids, len(answer)


def greedy_matches(logits: torch.Tensor, input_ids: torch.Tensor, answer_tokens: int) -> torch.Tensor:
    """Whether greedy decoding reproduces the last ``answer_tokens`` tokens of each row.

    ``logits``: ``[B, K, V]``, the logits of the last ``K >= answer_tokens + 1`` positions of
    ``input_ids`` ``[B, L]``. Returns ``[B]`` bool: every argmax that predicts an answer token
    equals that token.
    """
    predicted = logits[:, -answer_tokens - 1 : -1].argmax(-1)
    return (predicted == input_ids[:, -answer_tokens:]).all(-1)


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
    desc: str = "passkey",
) -> list[PasskeyPoint]:
    """Retrieval accuracy at every (length, depth), over ``trials`` random 5-digit keys each.

    The keys are :func:`passkey_keys`, so every model sees the same trials. Raises
    ``ValueError`` for a length below :func:`min_passkey_length`.
    """
    keys = passkey_keys(trials, seed)
    device = next(model.parameters()).device
    points = []
    with tqdm(total=len(lengths) * len(depths) * trials, desc=desc, unit="trial", leave=False) as bar:
        for length in lengths:
            for depth in depths:
                hits = 0
                for key in keys:
                    ids, answer_tokens = passkey_prompt(tokenizer, int(length), float(depth), key)
                    input_ids = torch.tensor([ids], device=device)
                    logits = model(input_ids=input_ids, logits_to_keep=answer_tokens + 1).logits
                    hits += int(greedy_matches(logits, input_ids, answer_tokens).item())
                    bar.update(1)
                points.append(PasskeyPoint(length=int(length), depth=float(depth), accuracy=hits / trials, trials=trials))
                logger.info("%s: length %d depth %.2f accuracy %.2f", desc, length, depth, hits / trials)
    return points
