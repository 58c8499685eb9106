"""Fine-tuning for long context: packing, chunked loss, FSDP2 set-up, the pipeline behind recipes/finetune.py."""

from .arguments import DataArguments, LoraArguments, ModelArguments, parse_args
from .context_parallel import check_context_parallel, context_parallel_obstacles, parallelism_config
from .data import load_documents, pack_documents, packed_dataset, tokenize_documents
from .fsdp import check_sharded, sharding_report
from .loss import causal_lm_loss, chunked_cross_entropy, use_chunked_loss
from .recipe import add_lora, load_model, merge_adapter, run

__all__ = [
    "DataArguments",
    "LoraArguments",
    "ModelArguments",
    "add_lora",
    "causal_lm_loss",
    "check_context_parallel",
    "check_sharded",
    "chunked_cross_entropy",
    "context_parallel_obstacles",
    "load_documents",
    "load_model",
    "merge_adapter",
    "pack_documents",
    "packed_dataset",
    "parallelism_config",
    "parse_args",
    "run",
    "sharding_report",
    "tokenize_documents",
    "use_chunked_loss",
]
