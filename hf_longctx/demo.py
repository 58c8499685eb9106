"""The demo: every technique on a byte-level Llama trained here, on the Python standard library.

No checkpoint can be downloaded, so the demo trains its own model on text that every machine with
Python has: the ``.py`` files of the standard library (found through ``sysconfig``). Files are
split by a hash of their path, so the held-out files never reach training and the split is the
same everywhere. The first run trains the model at a short context (128 bytes) and fine-tunes two
copies at 4x (plain RoPE, the control, and YaRN); all three are cached (safetensors) under
``$XDG_CACHE_HOME/hf_longctx`` (default ``~/.cache/hf_longctx``) in a folder named after a hash of
the settings, so a rerun only evaluates (a change of the fine-tuning settings keeps the pre-trained model).

The evaluation scores held-out bits per byte at 1x to 16x the trained length, the same final bytes
of the same windows at every length (:func:`hf_longctx.evaluation.perplexity_vs_length`), for the
unpatched model, each RoPE scaling without fine-tuning, a sliding window with and without attention
sinks, and the two fine-tunes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
import sys
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import from_pretrained, patch, save_pretrained
from .evaluation import markdown_table, perplexity_vs_length, plot_lines, write_json
from .loading import write_atomically

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the trained models (hashed into the cache folder name) and the evaluation."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    trained_length: int = 128  # bytes per training window = the model's max_position_embeddings
    steps: int = 600  # pre-training steps
    batch_size: int = 32
    learning_rate: float = 3e-3
    finetune_factor: int = 4  # fine-tune at this multiple of the trained length
    finetune_steps: int = 80
    finetune_batch_size: int = 8  # same bytes per step as pre-training at 4x
    finetune_learning_rate: float = 1e-3
    holdout_every: int = 20  # a file is held out when crc32(path) % holdout_every == 0
    seed: int = 0
    # evaluation only (not part of any cache key)
    max_factor: int = 16  # lengths are trained_length * 1, 2, 4, ... max_factor
    windows: int = 32
    sink_tokens: int = 4

    def cache_key(self, names: tuple[str, ...]) -> str:
        """A short hash of the named fields (and of the Python version, whose stdlib is the training text)."""
        fields = {name: getattr(self, name) for name in names}
        fields["python"] = list(sys.version_info[:2])
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def lengths(self) -> list[int]:
        return [self.trained_length * 2**i for i in range(int(math.log2(self.max_factor)) + 1)]


# The fields that decide the pre-trained model, and those that decide a fine-tune of it: each model's
# cache folder is named after a hash of what decides it, so changing a fine-tune keeps the base model.
BASE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "trained_length",
    "steps",
    "batch_size",
    "learning_rate",
    "holdout_every",
    "seed",
)
FINETUNE_FIELDS = ("finetune_factor", "finetune_steps", "finetune_batch_size", "finetune_learning_rate")

# A setting small enough for tests: seconds, not minutes (numbers are meaningless).
QUICK = DemoSettings(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    trained_length=16,
    steps=4,
    batch_size=4,
    finetune_steps=2,
    finetune_batch_size=2,
    max_factor=4,
    windows=2,
)


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255): the demo model's tokenizer, and the fallback for models without one."""

    def __init__(self, vocab_size: int = 256):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        too_large = [i for i in ids if i >= self.vocab_size]
        if too_large:
            raise ValueError(
                f"the text has byte value {too_large[0]}, beyond this model's vocabulary of {self.vocab_size} "
                "byte tokens; give ASCII text or a model with a tokenizer"
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hf_longctx"


def stdlib_split(holdout_every: int) -> tuple[list[Path], list[Path]]:
    """The standard library's ``.py`` files (installed packages excluded), split into (train, held out).

    A file is held out when the CRC-32 of its path relative to the stdlib is a multiple of
    ``holdout_every``: deterministic, and independent of which other files exist.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    installed = {"site-packages", "dist-packages"}
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in installed]  # not walked: can be 10^5 files
        paths += [Path(folder, name) for name in files if name.endswith(".py")]
    train, held_out = [], []
    for path in sorted(paths):
        relative = path.relative_to(root)
        (held_out if zlib.crc32(relative.as_posix().encode()) % holdout_every == 0 else train).append(path)
    if not train or not held_out:
        raise RuntimeError(f"found no standard library source under {root}; the demo trains on it")
    return train, held_out


def read_bytes(paths: list[Path]) -> torch.Tensor:
    """The files' bytes, concatenated, as a 1-D uint8 tensor."""
    return torch.frombuffer(bytearray(b"".join(p.read_bytes() for p in paths)), dtype=torch.uint8)


def build_model(settings: DemoSettings) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        max_position_embeddings=settings.trained_length,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def train(
    model: nn.Module,
    data: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    length: int,
    learning_rate: float,
    seed: int,
    desc: str,
) -> nn.Module:
    """Pre-training from scratch: next-byte prediction on random windows of ``data`` (1-D uint8).

    AdamW, linear warm-up, cosine decay to a tenth. (Fine-tuning goes through the recipe's
    trainer, :func:`finetune`; this loop samples windows anywhere in the text, which packing does not.)
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))),
    )
    model.train()
    with tqdm(range(steps), desc=desc, unit="step") as bar:
        for _ in bar:
            starts = torch.randint(0, len(data) - length, (batch_size,), generator=generator)
            batch = torch.stack([data[s : s + length] for s in starts.tolist()]).long()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(bits_per_byte=f"{loss.item() / math.log(2):.3f}")
    return model.eval()


def finetune(model: nn.Module, files: list[Path], settings: DemoSettings) -> nn.Module:
    """Fine-tune at ``finetune_factor`` times the trained length with the recipe's trainer.

    The training files, in a seeded random order, are packed by :func:`hf_longctx.training.pack_documents`
    (positions restart at each file) into just enough sequences for ``finetune_steps`` steps, and
    trained by the recipe's ``LongContextTrainer`` (transformers ``Trainer``): AdamW, cosine schedule.
    """
    from datasets import Dataset
    from transformers import TrainingArguments, default_data_collator

    from .training import pack_documents
    from .training.recipe import LongContextTrainer

    order = list(files)
    random.Random(settings.seed).shuffle(order)
    length = settings.trained_length * settings.finetune_factor
    needed = settings.finetune_steps * settings.finetune_batch_size
    rows = list(itertools.islice(pack_documents((p.read_bytes() for p in order), length), needed))
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=settings.finetune_steps,
            per_device_train_batch_size=settings.finetune_batch_size,
            learning_rate=settings.finetune_learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, settings.finetune_steps // 20),
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=settings.seed,
            dataloader_num_workers=0,
        )
        model.config.use_cache = False  # packed batches: the mask comes from position_ids, only without a cache
        trainer = LongContextTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=default_data_collator
        )
        trainer.train()
    model.config.use_cache = True
    return model.eval()


def _cached(path: Path, make: Callable[[], nn.Module]) -> nn.Module:
    """The model saved at ``path``, or ``make()`` saved there first (atomically: a killed run leaves no half folder)."""
    if (path / "config.json").is_file():
        logger.info("loading cached %s", path)
        return from_pretrained(path).eval()
    model = make()
    write_atomically(path, lambda folder: save_pretrained(model, folder))
    return model


def demo_models(settings: DemoSettings, train_files: list[Path]) -> dict[str, Callable[[], nn.Module]]:
    """Method name -> a function giving the model to evaluate (trained or loaded from the cache)."""
    folder = cache_root() / f"demo-{settings.cache_key(BASE_FIELDS)}"
    top = settings.max_factor
    ft = settings.finetune_factor

    def base() -> nn.Module:
        return _cached(
            folder / "base",
            lambda: train(
                build_model(settings),
                read_bytes(train_files),
                steps=settings.steps,
                batch_size=settings.batch_size,
                length=settings.trained_length,
                learning_rate=settings.learning_rate,
                seed=settings.seed,
                desc=f"training at {settings.trained_length} bytes",
            ),
        )

    def finetuned(name: str, spec: dict | None) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            model = base()
            if spec is not None:
                model = patch(model, spec)
            tqdm.write(f"fine-tuning {name} at {settings.trained_length * ft} bytes")
            return finetune(model, train_files, settings)

        return lambda: _cached(folder / f"finetune-{name}-{settings.cache_key(FINETUNE_FIELDS)}", make)

    def patched(spec: dict) -> Callable[[], nn.Module]:
        return lambda: patch(base(), spec)

    methods: dict[str, Callable[[], nn.Module]] = {
        "none": base,
        "linear": patched({"rope": {"type": "linear", "factor": float(top)}}),
        "ntk": patched({"rope": {"type": "ntk", "factor": float(top)}}),
        "dynamic": patched({"rope": {"type": "dynamic", "factor": float(top)}}),
        "yarn": patched({"rope": {"type": "yarn", "factor": float(top)}}),
    }
    window = settings.trained_length
    methods[f"window {window}"] = patched({"attention": {"sliding_window": window}})
    methods[f"window {window} + {settings.sink_tokens} sinks"] = patched(
        {"attention": {"sliding_window": window, "sink_tokens": settings.sink_tokens}}
    )
    methods[f"rope fine-tuned {ft}x"] = finetuned("rope", None)
    methods[f"yarn {ft}x fine-tuned {ft}x"] = finetuned("yarn", {"rope": {"type": "yarn", "factor": float(ft)}})
    return methods


def run_demo(out_dir: str | Path, settings: DemoSettings = DemoSettings()) -> list[dict[str, Any]]:
    """Train or load the models, evaluate every method, write ``results.json`` and ``bits_per_byte.png``.

    Returns the rows ``{"method", "length", "bits_per_byte"}`` (also in ``results.json``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_files, held_out_files = stdlib_split(settings.holdout_every)
    held_out = read_bytes(held_out_files)
    tqdm.write(
        f"standard library: {len(train_files)} training files, {len(held_out_files)} held-out files "
        f"({len(held_out) / 1e6:.1f} MB held out); trained length {settings.trained_length} bytes"
    )
    methods = demo_models(settings, train_files)
    rows = []
    for name, make in tqdm(methods.items(), desc="methods", unit="method"):
        points = perplexity_vs_length(
            make(), held_out, settings.lengths, num_windows=settings.windows, token_bytes=len, desc=name
        )
        rows += [{"method": name, "length": p.length, "bits_per_byte": p.bits_per_byte} for p in points]
        tqdm.write(f"{name}: " + ", ".join(f"{p.length}: {p.bits_per_byte:.3f}" for p in points))
    write_json(rows, out_dir / "results.json")
    plot_lines(
        rows,
        out_dir / "bits_per_byte.png",
        "bits_per_byte",
        title=f"held-out bits per byte, byte-level Llama trained at {settings.trained_length}",
        ylabel="bits per byte (lower is better)",
        reference_x=settings.trained_length,
    )
    table = markdown_table(rows, "bits_per_byte")
    scored = settings.trained_length - 1
    print(
        f"\nHeld-out bits per byte ({settings.windows} windows, the same last {scored} bytes scored at every length):\n"
    )
    print(table)
    by_key = {(r["method"], r["length"]): r["bits_per_byte"] for r in rows}
    reference = by_key[("none", settings.trained_length)]
    longest = settings.lengths[-1]
    print(
        f"\nBits per byte at {longest} ({settings.max_factor}x) relative to the unpatched model at "
        f"{settings.trained_length} ({reference:.3f}): "
        + ", ".join(f"{name} {by_key[(name, longest)] / reference:.2f}x" for name in methods)
    )
    print(f"\nWrote {out_dir / 'results.json'} and {out_dir / 'bits_per_byte.png'}")
    return rows
