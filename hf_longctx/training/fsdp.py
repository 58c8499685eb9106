"""FSDP2 set-up that also really shards on the CPU, and a check that it did.

``accelerate launch`` with an FSDP config exports ``ACCELERATE_USE_FSDP=true`` and the
``FSDP_*`` settings, but on a machine without accelerators ``AcceleratorState`` resolves to
no distribution (or ``MULTI_CPU``, i.e. DDP) and ignores the FSDP plugin: every process
trains a full copy and nothing says so. :func:`prepare_cpu_fsdp` (before the
``TrainingArguments`` exist) makes the processes form a gloo group, and
:func:`enable_cpu_fsdp` (right after the ``Accelerator`` exists) turns that state into an
FSDP one, so ``Accelerator.prepare`` applies ``fully_shard`` exactly as on GPUs. With
accelerators present both are no-ops. :func:`sharding_report` says which parameters are
sharded, and :func:`check_sharded` fails loudly when FSDP was asked for but did not happen.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``distributed_type: FSDP`` in the accelerate config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _cpu_multiprocess() -> bool:
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def prepare_cpu_fsdp() -> None:
    """Before any ``TrainingArguments``/``Accelerator``: on a CPU-only multi-process FSDP launch, use gloo."""
    if fsdp_requested() and _cpu_multiprocess():
        os.environ["ACCELERATE_USE_CPU"] = "true"


def enable_cpu_fsdp(accelerator) -> bool:
    """Turn a freshly created CPU ``MULTI_CPU`` accelerator state into FSDP; returns whether it did."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not (fsdp_requested() and state.distributed_type == DistributedType.MULTI_CPU):
        return False
    # Both shared states, as AcceleratorState does for GPUs: every later AcceleratorState() copies PartialState's.
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* settings the launcher exported
    logger.info(
        "FSDP%d on CPU: %d processes over %s", state.fsdp_plugin.fsdp_version, state.num_processes, state.backend
    )
    return True


def sharding_report(model: nn.Module) -> dict[str, dict]:
    """For each parameter: its global shape, this rank's local shape, and its DTensor placements (or None)."""
    from torch.distributed.tensor import DTensor

    report = {}
    for name, param in model.named_parameters():
        sharded = isinstance(param, DTensor)
        report[name] = {
            "shape": list(param.shape),
            "local_shape": list(param.to_local().shape if sharded else param.shape),
            "placements": [repr(p) for p in param.placements] if sharded else None,
            "requires_grad": param.requires_grad,
        }
    return report


def check_sharded(model: nn.Module) -> None:
    """Raise if FSDP was requested across several processes but some parameter is not a sharded DTensor."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not fsdp_requested() or world_size < 2:
        return
    unsharded = [name for name, info in sharding_report(model).items() if info["placements"] is None]
    if unsharded:
        raise RuntimeError(
            f"FSDP was requested for {world_size} processes but {len(unsharded)} parameters are not sharded "
            f"(e.g. {unsharded[0]}); the launch configuration did not apply fully_shard"
        )
    logger.info("FSDP: all parameters are DTensors sharded over %d processes", world_size)
