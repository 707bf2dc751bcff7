"""Preemption signals are recorded, decided on by every rank together, and end a real run with status 75."""

import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import yaml

from mambatrain.checkpoint.folder import LAST, newest_good
from mambatrain.checkpoint.io import verify
from mambatrain.checkpoint.preemption import REQUEUE_EXIT_CODE, PreemptionSignals, requeue_slurm_job


def test_signals_are_recorded_and_handlers_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.requested(SimpleNamespace(world_size=1)) == {signal.SIGUSR1}
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_signal_on_any_rank_stops_every_rank():
    # Rank 0 got nothing; the all-reduce brings in rank 1's SIGTERM.
    other_rank = torch.tensor([1.0, 0.0])
    strategy = SimpleNamespace(root_device=torch.device("cpu"),
                               reduce=lambda flags, reduce_op: flags + other_rank if reduce_op == "sum" else None)
    trainer = SimpleNamespace(world_size=2, strategy=strategy)
    assert PreemptionSignals().requested(trainer) == {signal.SIGTERM}


def test_slurm_requeue_calls_scontrol(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'called'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert not requeue_slurm_job()  # not a SLURM job
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_slurm_job()
    assert (tmp_path / "called").read_text().split() == ["requeue", "4242"]


TINY = {
    "model": {"kind": "hybrid", "d_model": 32, "n_layers": 2, "vocab_size": 32, "pattern": "MA",
              "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 64}, "attention": {"n_heads": 4}},
    "data": {"seq_len": 32, "batch_size": 2, "mqar": {"num_kv_pairs": 4, "val_samples": 4}},
    "trainer": {"max_steps": 100000, "accelerator": "cpu", "accumulate_grad_batches": 2,
                "checkpoint_every_n_steps": 5, "val_every_n_steps": 100000, "limit_val_batches": 1},
}


def run_until_first_checkpoint_then_sigterm(tmp_path, *overrides):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "logging": {"root_dir": str(tmp_path), "run_name": "tiny"}}))
    folder = tmp_path / "tiny" / "version_0" / "checkpoints"
    # One thread: on a shared CPU a second OpenMP thread of a tiny model only waits for a core.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "mambatrain", "fit", str(recipe), "--resume", "auto",
                                *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               env=env)
    try:
        deadline = time.time() + 120
        while newest_good(folder) is None and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)  # training is under way once the first periodic checkpoint exists
        process.send_signal(signal.SIGTERM)  # to this process only: with DDP, rank 0 of two
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == REQUEUE_EXIT_CODE, stderr[-3000:]
    assert "Traceback" not in stderr
    return folder, stderr


def test_sigterm_checkpoints_at_a_step_boundary_and_exits_75(tmp_path):
    folder, stderr = run_until_first_checkpoint_then_sigterm(tmp_path)
    assert "SIGTERM received: saved" in stderr
    saved = verify(newest_good(folder))
    assert saved["global_step"] > 5  # past the periodic checkpoint: the preemption wrote its own
    assert verify(folder / LAST)["sha256"] == saved["sha256"]
    checkpoint = torch.load(folder / LAST, weights_only=False)
    # Lightning counts a micro-batch as completed after on_train_batch_end: 2 x steps - 1 completed means the
    # save came right after the second micro-batch of the step, never between its two micro-batches.
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] + 1 == \
        2 * checkpoint["global_step"]


@pytest.mark.slow
def test_sigterm_to_rank_0_stops_both_ddp_ranks_at_the_same_step(tmp_path):
    folder, stderr = run_until_first_checkpoint_then_sigterm(tmp_path, "--trainer.devices", "2",
                                                              "--trainer.strategy", "ddp")
    # Rank 1 received nothing itself: the all-reduced request stopped it at rank 0's step.
    stops = re.findall(r"SIGTERM received: saved \S+ at step (\d+)", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]
    assert verify(newest_good(folder))["global_step"] == int(stops[0])
