"""The checkpoint callback: periodic and preemption saves, always at an optimizer-step boundary.

Replaces Lightning's ModelCheckpoint, whose top-k bookkeeping lives in memory (a crash forgets which files it
meant to delete) and which knows nothing of preemption.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L

from .folder import prune, publish_last, step_name, tidy
from .preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionSignals, requeue_slurm_job

log = logging.getLogger("mambatrain")


class StepCheckpoint(L.Callback):
    """Saves ``folder/stepNNNNNNN.ckpt`` every ``every_n_steps`` optimizer steps and when a preemption signal
    arrived, keeps the newest ``keep_last``, and points ``last.ckpt`` at the newest.

    A step ends in the ``on_train_batch_end`` of its last micro-batch, where ``global_step`` has just grown:
    saving there, never between micro-batches of an accumulated step, is what makes a resume exact.
    """

    def __init__(self, folder: Path, every_n_steps: int, keep_last: int, signals: PreemptionSignals | None = None):
        self.folder = Path(folder)
        self.every, self.keep_last, self.signals = every_n_steps, keep_last, signals
        self._step_at_batch_start = -1

    def on_train_start(self, trainer, pl_module) -> None:
        if self.signals is not None:
            self.signals.take_over(trainer)
        if trainer.is_global_zero:
            tidy(self.folder, trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # a micro-batch inside an accumulated step
        received = self.signals.requested(trainer) if self.signals is not None else set()
        path = None
        if received or trainer.global_step % self.every == 0:
            path = self.save(trainer)
        if received:
            names = "+".join(signal.Signals(s).name for s in sorted(received))
            log.warning("%s received: saved %s at step %d; exiting with status %d for a requeue "
                        "(continue with --resume auto)", names, path, trainer.global_step, REQUEUE_EXIT_CODE)
            if signal.SIGUSR1 in received and trainer.is_global_zero:
                requeue_slurm_job()
            raise Preempted(trainer.global_step, path, names)

    def save(self, trainer) -> Path:
        path = self.folder / step_name(trainer.global_step)
        trainer.save_checkpoint(path)  # every rank: gathers state (and data positions) collectively
        if trainer.is_global_zero:
            publish_last(path)
            prune(self.folder, self.keep_last, trainer.global_step)
        return path
