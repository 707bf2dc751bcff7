"""Preemption: SIGTERM or SIGUSR1 asks the run to checkpoint at the next optimizer-step boundary and exit.

The exit status is 75 (``EX_TEMPFAIL``, "try again later"): a job script requeues on it, e.g.
``srun mambatrain fit ... --resume auto || { [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID; }``, or a
cluster sets ``RequeueExit=75`` in slurm.conf. Under SLURM, SIGUSR1 (what ``#SBATCH --signal=USR1@90`` sends
before the time limit) also requeues the job from rank 0, as Lightning's own SLURM handler did; SIGTERM does
not, because ``scancel`` sends it too and a cancelled job must stay cancelled (a preempting SLURM requeues
the job itself).

Why not Lightning's handling: its SLURM handler saves inside the signal handler, wherever the loop happens to
be (between two micro-batches of an accumulated step, in the middle of a backward pass), and its SIGTERM
handler stops after the current micro-batch without saving. Here the handlers only record the signal; the
checkpoint callback acts on it once the optimizer step is complete, and the request is all-reduced so that
every rank saves and stops at the same step.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading

import torch

log = logging.getLogger("mambatrain")

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits the process with ``REQUEUE_EXIT_CODE``."""

    def __init__(self, step: int, checkpoint, signal_name: str):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class PreemptionSignals:
    """Records SIGTERM / SIGUSR1; ``requested(trainer)`` answers, identically on every rank, whether any got one.

    Use as a context manager around ``trainer.fit`` (installs the handlers, restores the previous ones), and call
    ``take_over(trainer)`` once training starts: Lightning installs its own SIGTERM handler in ``fit``.
    """

    def __init__(self):
        self.received: set[int] = set()
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        # Only a flag: the handler runs between two bytecodes of whatever the loop is doing.
        self.received.add(signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: preemption signals are not handled")
            return
        for signum in SIGNALS:
            previous = signal.signal(signum, self._handler)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def __enter__(self) -> "PreemptionSignals":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def take_over(self, trainer) -> None:
        """Replace the SIGTERM handler Lightning installed in ``fit`` by ours, keeping a signal already received."""
        if not self._previous:
            return
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and connector.received_sigterm:
            # Lightning would stop after the next micro-batch without a checkpoint; the request is ours now.
            connector.received_sigterm = False
            self.received.add(signal.SIGTERM)
        for signum in SIGNALS:
            signal.signal(signum, self._handler)

    def requested(self, trainer) -> set[int]:
        """The signals received by any rank (empty: carry on). A collective: every rank must call it, each step."""
        if trainer.world_size <= 1:
            return set(self.received)
        flags = torch.tensor([float(s in self.received) for s in SIGNALS], device=trainer.strategy.root_device)
        flags = trainer.strategy.reduce(flags, reduce_op="sum")
        return {s for s, flag in zip(SIGNALS, flags.tolist()) if flag > 0}


def slurm_job_id() -> str | None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job; False (logged) when not under SLURM or when it fails."""
    job = slurm_job_id()
    if not job or shutil.which("scontrol") is None:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True
