"""The fine-tuning pipeline behind ``recipes/finetune.py``.

load the model (pretrained, or random from a config) -> ``hf_longctx.patch`` -> with
``context_parallel_size`` > 1, the checks and accelerate ``ParallelismConfig`` of
:mod:`.context_parallel` -> optional
LoRA (LongLoRA: adapters on the attention projections, embeddings and norms trained in
full) -> documents -> tokenized -> packed to ``context_length`` -> ``transformers.Trainer``
(FSDP2, activation checkpointing, mixed precision, gradient accumulation, LR schedule,
checkpoints and resume, progress bar, logs: all from ``TrainingArguments`` and the
accelerate config) -> ``hf_longctx.save_pretrained`` with the patch recorded -> optional push.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from .. import compat, loading
from ..hub import from_pretrained, push_to_hub, save_pretrained
from ..patching import patch
from ..spec import load_spec
from .arguments import DataArguments, LoraArguments, ModelArguments, parse_args
from .context_parallel import check_context_parallel, parallelism_config
from .data import load_documents, packed_dataset, tokenize_documents
from .fsdp import check_sharded, enable_cpu_fsdp, fsdp_requested, prepare_cpu_fsdp

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # subfolder of output_dir holding the LoRA adapter (peft format)


def load_model(model_args: ModelArguments, seed: int) -> PreTrainedModel:
    """The causal LM to train, patched as ``model_args.patch`` says, with the KV cache off for training."""
    dtype = getattr(torch, model_args.dtype)
    if model_args.model_config is not None:
        config = model_args.model_config
        if isinstance(config, dict):
            config = AutoConfig.for_model(**config)
        else:
            config = AutoConfig.from_pretrained(config)
        set_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=model_args.attn_implementation)
    else:
        model = loading.load_model(
            loading.resolve(model_args.model_name_or_path, model_args.gguf_file),
            dtype=dtype,
            attn_implementation=model_args.attn_implementation,
        )
    if model_args.patch is not None:
        patched = patch(model, model_args.patch)
        if patched is not model:
            raise ValueError(
                f"the patch {model_args.patch!r} wraps the model ({type(patched).__name__}); "
                "this recipe trains plain causal LMs (use rope, alibi, attention or moe sections)"
            )
    # Packed batches need the mask built from position_ids, which transformers skips when a cache exists.
    model.config.use_cache = False
    return model


def load_tokenizer(model_args: ModelArguments):
    """``tokenizer_name_or_path``, else the tokenizer of the model's checkpoint (a GGUF file carries its own)."""
    if model_args.tokenizer_name_or_path is not None:
        return AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
    tokenizer = loading.load_tokenizer(loading.resolve(model_args.model_name_or_path, model_args.gguf_file))
    if tokenizer is None:
        raise ValueError(f"{model_args.model_name_or_path} has no tokenizer: set tokenizer_name_or_path")
    return tokenizer


def _modules_to_save(model: PreTrainedModel, suffixes) -> list[str] | None:
    """The module names of ``model`` that end with one of ``suffixes`` ("norm": every ``*norm``).

    peft up to 0.21 matched ``modules_to_save`` as suffixes of the module paths, so "norm" also took
    ``input_layernorm``; since 0.22 an entry matches whole names only. Resolving the suffixes here trains the same
    modules with either."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    return sorted(n for n in names if any(n.endswith(s) for s in suffixes)) or None


def add_lora(model: PreTrainedModel, lora_args: LoraArguments):
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters (LongLoRA style ``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=list(lora_args.lora_target_modules),
        modules_to_save=_modules_to_save(model, list(lora_args.lora_modules_to_save)),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA: %d of %d parameters trainable (%.2f%%)", trainable, total, 100 * trainable / total)
    return peft_model


def build_dataset(data_args: DataArguments, tokenizer, training_args: TrainingArguments):
    """Documents -> tokens -> packed sequences; the main process builds the ``datasets`` cache first."""
    with training_args.main_process_first(desc="preparing the dataset"):
        documents = load_documents(data_args.dataset, config=data_args.dataset_config, split=data_args.split)
        if data_args.max_documents is not None:
            documents = documents.select(range(min(data_args.max_documents, len(documents))))
        tokenized = tokenize_documents(documents, tokenizer, data_args.text_column, data_args.add_eos)
        return packed_dataset(tokenized, data_args.context_length, data_args.packing)


class LongContextTrainer(Trainer):
    """``Trainer`` whose FSDP launch shards on CPU-only machines too (see :mod:`.fsdp`)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if enable_cpu_fsdp(self.accelerator):
            self.is_fsdp_enabled = True


class CheckShardedCallback(TrainerCallback):
    """Fail at the start of training if FSDP was requested but the parameters are not sharded."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_sharded(model)


def _move_activation_checkpointing_to_fsdp(training_args: TrainingArguments) -> None:
    # Under FSDP2 checkpointing must be applied by accelerate before fully_shard; one switch serves both launches.
    if fsdp_requested() and getattr(training_args, compat.ACTIVATION_CHECKPOINTING):
        os.environ["FSDP_ACTIVATION_CHECKPOINTING"] = "true"
        setattr(training_args, compat.ACTIVATION_CHECKPOINTING, False)


def _check_one_checkpointing(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    tiling = load_spec(model_args.patch).tiling if model_args.patch is not None else None
    if tiling is not None and tiling.checkpointing and getattr(training_args, compat.ACTIVATION_CHECKPOINTING):
        raise ValueError(f"the patch's tiling checkpoints every layer already (checkpointing: true); set "
                         f"{compat.ACTIVATION_CHECKPOINTING}: false, or tiling.checkpointing: false")


def merge_adapter(model_args: ModelArguments, seed: int, adapter_dir: str | Path) -> PreTrainedModel:
    """The base model of ``model_args`` (patched) with the LoRA adapter in ``adapter_dir`` merged into it."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(model_args, seed), adapter_dir).merge_and_unload()


def save_final_model(trainer: Trainer, model_args: ModelArguments, lora_args: LoraArguments, tokenizer) -> Path:
    """Write the trained model to ``output_dir`` with ``hf_longctx.save_pretrained`` (patch recorded).

    The full state dict is gathered from the shards (every rank takes part). Full fine-tuning
    saves it as the model. LoRA: the main process loads it into a fresh, unsharded copy of
    the patched model with the same adapters (names free of FSDP and checkpointing wrappers),
    saves the adapter to ``output_dir/adapter`` and, with ``merge_lora``, the merged model to
    ``output_dir``.
    """
    accelerator = trainer.accelerator
    output_dir = Path(trainer.args.output_dir)
    state_dict = accelerator.get_state_dict(trainer.model)
    if accelerator.is_main_process:
        if lora_args.lora:
            peft_model = add_lora(load_model(model_args, trainer.args.seed), lora_args)
            peft_model.load_state_dict(state_dict)
            peft_model.save_pretrained(output_dir / ADAPTER_DIR)
            if lora_args.merge_lora:
                save_pretrained(peft_model.merge_and_unload(), output_dir)
        else:
            save_pretrained(accelerator.unwrap_model(trainer.model), output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
    return output_dir


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    training_args: TrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> Trainer:
    """The whole recipe; returns the trainer after training and saving."""
    push, training_args.push_to_hub = training_args.push_to_hub, False  # pushed below, with the model card
    _check_one_checkpointing(model_args, training_args)
    _move_activation_checkpointing_to_fsdp(training_args)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, training_args.seed)
    if data_args.context_parallel_size > 1:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        check_context_parallel(model, data_args.context_parallel_size, data_args.context_length, data_args.packing,
                               world_size)
        training_args.parallelism_config = parallelism_config(data_args.context_parallel_size, world_size)
        logger.info("context parallelism: %s", training_args.parallelism_config)
    if lora_args.lora:
        model = add_lora(model, lora_args)
    train_dataset = build_dataset(data_args, tokenizer, training_args)
    trainer = LongContextTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[CheckShardedCallback(), *(callbacks or [])],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()
    output_dir = save_final_model(trainer, model_args, lora_args, tokenizer)
    if push and trainer.accelerator.is_main_process:
        repo_id = training_args.hub_model_id or output_dir.name
        url = push_to_hub(
            from_pretrained(output_dir),
            repo_id,
            private=training_args.hub_private_repo,
            token=training_args.hub_token,
            base_model_name=model_args.model_name_or_path,
            tokenizer=tokenizer,
        )
        logger.info("pushed %s to %s", output_dir, url)
    return trainer


def main(argv: list[str] | None = None) -> Trainer:
    """Entry point of ``recipes/finetune.py``: parse the config and command line, then :func:`run`."""
    prepare_cpu_fsdp()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run(*parse_args(argv))
