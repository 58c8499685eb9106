"""Writes the data of recipes/configs/tiny.yaml: tiny.jsonl and the character tokenizer tiny-tokenizer/.

    python recipes/data/make_tiny_data.py

The documents are sentences from a small grammar (learnable in a few steps, so the loss
visibly falls) of 40 to 900 characters: some fill several 256-token sequences, many share
one. The tokenizer maps each ASCII character to its code point (ids < 128, the tiny
models' vocabulary); ids 0-3 are <pad>, <s>, </s>, <unk>.
"""

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "the teacher"]
VERBS = ["sees", "likes", "finds", "follows", "paints", "reads about", "waits for"]
OBJECTS = ["the river", "a red ball", "the long road", "an apple", "the quiet house", "a blue kite"]
PLACES = ["in the morning", "at night", "near the sea", "after lunch", "in the garden"]


def sentence(rng: random.Random) -> str:
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.5:
        text += f" {rng.choice(PLACES)}"
    return text[0].upper() + text[1:] + "."


def document(rng: random.Random) -> str:
    target = rng.choice([40, 80, 150, 250, 400, 900])
    sentences = []
    while sum(len(s) + 1 for s in sentences) < target:
        sentences.append(sentence(rng))
    return " ".join(sentences)


def tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({chr(code): code for code in [10, *range(32, 127)]})
    # BPE without merges: every character is one token.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def main() -> None:
    rng = random.Random(0)
    with open(HERE / "tiny.jsonl", "w", encoding="utf-8") as f:
        for _ in range(150):
            f.write(json.dumps({"text": document(rng)}) + "\n")
    tokenizer().save_pretrained(HERE / "tiny-tokenizer")


if __name__ == "__main__":
    main()
