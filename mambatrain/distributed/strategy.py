"""The recipe's trainer section -> a Lightning strategy (DDP or FSDP), and the run directory shared by all ranks.

Model code stays single-device: data parallelism wraps it here, from the outside.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from ..config.schema import Recipe
from ..models.block import Block

RUN_DIR_ENV = "MAMBATRAIN_RUN_DIR"


def global_rank() -> int:
    """This process's rank as the launchers announce it (torchrun, SLURM, Lightning's own launcher)."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def build_strategy(recipe: Recipe):
    t = recipe.trainer
    if t.strategy == "auto":
        return "auto"
    backend = "nccl" if torch.cuda.is_available() and t.accelerator != "cpu" else "gloo"
    if t.strategy == "ddp":
        # Every parameter gets a gradient in every step, so DDP need not search for unused ones.
        return DDPStrategy(process_group_backend=backend, find_unused_parameters=False)
    if t.strategy == "fsdp":
        # One FSDP unit per block: parameters are gathered a block at a time, in fp32 master form.
        return FSDPStrategy(process_group_backend=backend, auto_wrap_policy={Block},
                            sharding_strategy="FULL_SHARD", state_dict_type="full")
    return SingleDeviceStrategy()


def release_process_group() -> None:
    """Tear down the process group the strategy set up, once training no longer communicates.

    Lightning leaves it up when fit returns. Left to the interpreter's exit, gloo's worker threads can be
    destroyed while still joinable and the process aborts after a finished run ("terminate called without
    an active exception", pytorch#190489); NCCL warns of the same at every exit.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def data_parallel_size(recipe: Recipe) -> int:
    """Model replicas that read different data: all ranks, less the factor that splits each sequence."""
    return recipe.trainer.devices * recipe.trainer.num_nodes // recipe.trainer.context_parallel


def global_batch(recipe: Recipe) -> int:
    """Sequences per optimizer step: micro batch x accumulation x data-parallel ranks."""
    return recipe.data.batch_size * recipe.trainer.accumulate_grad_batches * data_parallel_size(recipe)
