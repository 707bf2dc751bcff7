"""Throughput (tokens/s), model FLOPs utilisation (from the analytic FLOPs of the recipe) and GPU memory."""

from __future__ import annotations

import time

import lightning as L
import torch

from ..plan import peak_flops, training_flops_per_token


class ThroughputMonitor(L.Callback):
    """Logs train/tokens_per_sec (on the progress bar) and train/mfu every ``log_every_n_steps``, and on a GPU the
    peak memory since the start: train/peak_allocated_gib (tensors: what ``mambatrain plan`` predicts) and
    train/peak_reserved_gib (what the process holds: the allocator's cache and CUDA graph pools too, whose
    replays the allocated figure does not see; nearer to what runs out).

    Times whole windows of steps and synchronises the GPU only at window edges (and around validation, which the
    windows leave out), so measuring does not slow training down.
    """

    def __init__(self, tokens_per_batch: int, flops_per_token: float, log_every_n_steps: int):
        self.tokens_per_batch = tokens_per_batch
        self.flops_per_token = flops_per_token
        self.every = log_every_n_steps
        self._window_start: float | None = None
        self._window_tokens = 0
        self._validation_start: float | None = None
        self._peak: float | None = None

    @classmethod
    def from_recipe(cls, recipe) -> "ThroughputMonitor":
        data = recipe.data
        # Each rank of a context-parallel group trains on its slice of the length, so all ranks together count
        # every token once (FLOPs per token stay those of the whole length: attention sees all of it).
        tokens = data.batch_size * data.seq_len // recipe.trainer.context_parallel
        return cls(tokens, training_flops_per_token(recipe.model, data.seq_len),
                   recipe.trainer.log_every_n_steps)

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            self._peak = peak_flops(torch.cuda.get_device_name(pl_module.device))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._window_start is None:
            self._sync(pl_module)
            self._window_start = time.perf_counter()
            self._window_tokens = 0

    # Validation inside a window (val_every_n_steps not a multiple of log_every_n_steps) is not training time.
    def on_validation_start(self, trainer, pl_module) -> None:
        if self._window_start is not None:
            self._sync(pl_module)
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._window_start is not None and self._validation_start is not None:
            self._sync(pl_module)
            self._window_start += time.perf_counter() - self._validation_start
        self._validation_start = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._window_tokens += self.tokens_per_batch
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not step_done or trainer.global_step % self.every != 0:
            return
        self._sync(pl_module)
        elapsed = time.perf_counter() - self._window_start
        tokens_per_sec = self._window_tokens * trainer.world_size / elapsed
        pl_module.log("train/tokens_per_sec", tokens_per_sec, prog_bar=True, rank_zero_only=True)
        if self._peak is not None:
            mfu = tokens_per_sec * self.flops_per_token / (self._peak * trainer.world_size)
            pl_module.log("train/mfu", mfu, rank_zero_only=True)
        device = pl_module.device
        if device.type == "cuda":
            pl_module.log("train/peak_allocated_gib", torch.cuda.max_memory_allocated(device) / 2**30,
                          rank_zero_only=True)
            pl_module.log("train/peak_reserved_gib", torch.cuda.max_memory_reserved(device) / 2**30,
                          rank_zero_only=True)
        self._window_start = None


class ValidateAtLastStep(L.Callback):
    """Has Lightning validate once more after the last optimizer step, inside fit (by asking it to stop there:
    a stop request triggers a validation).

    Under FSDP the run's final validation must happen there: a ``trainer.validate`` after fit runs the model
    without the root FSDP unit that fit wrapped it in, and the parameters that unit owns (the embedding, the
    final norm) are still flat shards ("'weight' must be 2-D", Lightning-AI/pytorch-lightning#19015).
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
