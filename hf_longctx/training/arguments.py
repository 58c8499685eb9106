"""The recipe's arguments: dataclasses read from a YAML config, every key overridable on the command line.

A config is one flat YAML mapping whose keys are fields of :class:`ModelArguments`,
:class:`DataArguments`, :class:`LoraArguments` or ``transformers.TrainingArguments``.
:func:`parse_args` turns it into ``--key value`` arguments placed before the command line's
own, so ``HfArgumentParser`` types and validates everything and a key given on the command
line wins (``--learning_rate 1e-5`` overrides ``learning_rate: 2e-5``). Mappings (an inline
patch spec, a model config) are passed as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .. import compat


def _mapping(value: dict | str | None, name: str) -> dict | str | None:
    """A JSON/YAML mapping given as text on the command line becomes a dict; other strings stay."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        parsed = yaml.safe_load(value)
        if not isinstance(parsed, dict):
            raise ValueError(f"--{name} looks like a mapping but does not parse as one: {value!r}")
        return parsed
    return value


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id, local folder or .gguf file of the pretrained causal LM to fine-tune."}
    )
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "A GGUF file inside model_name_or_path (folder or Hub repo), dequantized to `dtype` on load."},
    )
    model_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Instead of a pretrained model: a config mapping with `model_type` (or a config.json path); "
            "the model is randomly initialised from it with the training seed."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use; defaults to model_name_or_path."}
    )
    patch: dict | str | None = field(
        default=None,
        metadata={"help": "hf_longctx patch: a preset name, a YAML path, or an inline mapping of spec sections."},
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Dtype of the loaded weights (float32 master weights; bf16 compute comes from mixed precision)."},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "transformers attention implementation."})

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.model_config is None):
            raise ValueError(
                f"give exactly one of model_name_or_path ({self.model_name_or_path!r}) and model_config "
                f"({self.model_config!r})"
            )
        self.model_config = _mapping(self.model_config, "model_config")
        self.patch = _mapping(self.patch, "patch")


@dataclass
class DataArguments:
    dataset: str = field(
        default=None,
        metadata={"help": "A local .json/.jsonl/.parquet/.txt file or folder of them, or a Hub dataset name."},
    )
    context_length: int = field(default=None, metadata={"help": "Tokens per packed training sequence."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    split: str = field(default="train", metadata={"help": "Dataset split to train on."})
    text_column: str = field(default="text", metadata={"help": "Column holding the document text."})
    add_eos: bool = field(default=True, metadata={"help": "Append the tokenizer's EOS token to every document."})
    max_documents: int | None = field(default=None, metadata={"help": "Use only the first N documents."})
    packing: bool = field(
        default=True,
        metadata={"help": "Several documents per sequence, positions restarting at each (block-diagonal attention). "
                  "false: each sequence is context_length tokens of one document (context parallelism needs it)."},
    )
    context_parallel_size: int = field(
        default=1,
        metadata={"help": "GPUs that share one sequence (accelerate ParallelismConfig cp_size, FSDP2, CUDA SDPA); "
                  "the launch's processes must be a multiple of it."},
    )

    def __post_init__(self):
        if self.dataset is None:
            raise ValueError("`dataset` is required: a local data file/folder or a Hub dataset name")
        if self.context_length is None or self.context_length < 2:
            raise ValueError(f"`context_length` must be an integer >= 2, got {self.context_length!r}")
        if self.context_parallel_size < 1:
            raise ValueError(f"`context_parallel_size` must be >= 1, got {self.context_parallel_size}")


@dataclass
class LoraArguments:
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Module names that get adapters (LongLoRA: the attention projections)."},
    )
    lora_modules_to_save: list[str] = field(
        default_factory=lambda: ["embed_tokens", "norm"],
        metadata={"help": "Modules trained in full next to the adapters (LongLoRA: embeddings and every *norm)."},
    )
    merge_lora: bool = field(
        default=True, metadata={"help": "Also save the model with the adapters merged (loadable without peft)."}
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, LoraArguments, TrainingArguments)


def config_to_argv(config: dict[str, Any]) -> list[str]:
    """``{key: value}`` -> ``["--key", "value", ...]`` in the form ``HfArgumentParser`` reads back."""
    known = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)} | set(compat.TRAINING_ARGUMENT_RENAMES)
    argv = []
    for key, value in config.items():
        if key not in known:
            raise ValueError(
                f"unknown config key '{key}'; allowed keys are the fields of "
                f"{', '.join(cls.__name__ for cls in ARGUMENT_CLASSES)} (see --help)"
            )
        if value is None:
            continue
        if isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, LoraArguments, TrainingArguments]:
    """Parse ``--config FILE.yaml`` plus command-line overrides into the four argument dataclasses."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, rest = pre.parse_known_args(argv)
    config: dict[str, Any] = {}
    if known.config is not None:
        config = yaml.safe_load(known.config.read_text(encoding="utf-8")) or {}
        if not isinstance(config, dict):
            raise ValueError(f"config {known.config} must be a YAML mapping of keys to values")
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.add_argument("--config", type=Path, help="YAML file of defaults for every argument below.")
    model_args, data_args, lora_args, training_args, _ = parser.parse_args_into_dataclasses(
        args=compat.training_argv(config_to_argv(config) + rest)
    )
    if training_args.push_to_hub and lora_args.lora and not lora_args.merge_lora:
        raise ValueError(
            "push_to_hub uploads the patched model with the adapters merged into it: with lora: true it needs "
            "merge_lora: true (without it only the adapter is written, to output_dir/adapter)"
        )
    return model_args, data_args, lora_args, training_args
