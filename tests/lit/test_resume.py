"""A resumed run follows an uninterrupted run step by step and ends with the same weights."""

import csv
import json
import os
import shutil
import signal

import lightning as L
import pytest
import torch

from mambatrain import run
from mambatrain.checkpoint.io import marker_path
from mambatrain.checkpoint.preemption import REQUEUE_EXIT_CODE, Preempted
from mambatrain.config.load import load_recipe
from mambatrain.run import fit

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "model": {"kind": "hybrid", "d_model": 32, "n_layers": 2, "vocab_size": 32, "pattern": "MA", "d_mlp": 32,
              "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 64}, "attention": {"n_heads": 4}},
    "data": {"seq_len": 32, "batch_size": 4, "mqar": {"num_kv_pairs": 4, "val_samples": 8}},
    "scheduler": {"warmup_steps": 2},
    # Two micro-batches per step: a resume or a preemption between them would show.
    "trainer": {"max_steps": 6, "accumulate_grad_batches": 2, "checkpoint_every_n_steps": 1,
                "keep_last_checkpoints": 5, "val_every_n_steps": 100, "log_every_n_steps": 1,
                "limit_val_batches": 2},
}


def tiny_recipe(root, **trainer):
    return load_recipe(values={**TINY, "trainer": {**TINY["trainer"], **trainer},
                               "logging": {"root_dir": str(root), "run_name": "tiny"}})


def train_losses(run_dir) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        # A resumed run appends to the same file: the last value logged for a step is the resumed one.
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def assert_same_run(straight_dir, resumed_dir, from_step):
    a, b = final_weights(straight_dir), final_weights(resumed_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    straight_losses, resumed_losses = train_losses(straight_dir), train_losses(resumed_dir)
    steps = [s for s in straight_losses if s >= from_step]  # Lightning logs a step's loss under the count before it
    assert len(steps) >= 2
    for step in steps:
        assert abs(straight_losses[step] - resumed_losses[step]) < 1e-6, step



@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("straight")
    metrics = fit(tiny_recipe(root))
    return root / "tiny" / "version_0", metrics


def test_run_directory_records(straight):
    run_dir, _ = straight
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # keep_last_checkpoints: 5 of the six step checkpoints, each with its marker, and last.ckpt.
    kept = [f"step000000{step}.ckpt{suffix}" for step in (2, 3, 4, 5, 6) for suffix in ("", ".done")]
    assert names == ["last.ckpt", "last.ckpt.done"] + kept
    environment = json.loads((run_dir / "environment.json").read_text())
    for key in ("python", "torch", "lightning", "triton", "device", "command", "git_commit", "started_at"):
        assert key in environment
    assert environment["torch"] == torch.__version__ and environment["lightning"] == L.__version__
    assert (run_dir / "recipe.yaml").is_file()


# Step 2 of 6 is before half way: the resumed loader holds the 8 micro-batches left, and Lightning, which restores
# its count of the epoch's batches (4), once ended an "epoch" at its 8th and read the data from step 2 again.
@pytest.mark.parametrize("step", [2, 4])
def test_resume_matches_uninterrupted_run(straight, tmp_path, step):
    straight_dir, straight_metrics = straight
    # A run preempted after a step's checkpoint: only that file, copied by hand without its marker, survives.
    resumed_dir = tmp_path / "tiny" / "version_0"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    kept = resumed_dir / "checkpoints" / f"step{step}.ckpt"
    shutil.copy(straight_dir / "checkpoints" / f"step000000{step}.ckpt", kept)
    resumed = fit(tiny_recipe(tmp_path), resume=str(kept))
    assert_same_run(straight_dir, resumed_dir, from_step=step)
    assert abs(straight_metrics["val/loss"] - resumed["val/loss"]) < 1e-6


def test_resume_with_another_accumulation_keeps_the_data_position(straight, tmp_path):
    """Steps before the resume count with the checkpoint's accumulation, later ones with the resumed run's: 2 x 4
    samples a step becomes 1 x 8, and the run goes on with the same samples (and weights, to rounding)."""
    straight_dir, _ = straight
    resumed_dir = tmp_path / "tiny" / "version_0"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    kept = resumed_dir / "checkpoints" / "step2.ckpt"
    shutil.copy(straight_dir / "checkpoints" / "step0000002.ckpt", kept)
    recipe = tiny_recipe(tmp_path, accumulate_grad_batches=1)
    recipe.data.batch_size = 8
    fit(recipe, resume=str(kept))
    data = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)["RecipeDataModule"]
    assert (data["global_step"], data["batches_consumed"], data["samples_consumed"]) == (6, 2 * 2 + 4, 6 * 8)
    straight_weights = final_weights(straight_dir)
    for name, weight in final_weights(resumed_dir).items():
        torch.testing.assert_close(weight, straight_weights[name], rtol=1e-4, atol=1e-5, msg=name)


class SignalAtBatch(L.Callback):
    """Sends this process a signal as micro-batch ``batch_idx`` ends: the first half of an accumulated step."""

    def __init__(self, batch_idx: int, signum: int):
        self.batch_idx, self.signum = batch_idx, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), self.signum)


def test_preemption_mid_step_saves_at_the_step_boundary_and_resume_auto_is_exact(straight, tmp_path, monkeypatch):
    straight_dir, _ = straight
    build = run.build_trainer

    def with_signal(*args, **kwargs):
        trainer = build(*args, **kwargs)
        # SIGUSR1 here, SIGTERM in tests/checkpoint/test_preemption.py: micro-batch 1 of 2 of step 3.
        trainer.callbacks.insert(0, SignalAtBatch(batch_idx=4, signum=signal.SIGUSR1))
        return trainer

    monkeypatch.setattr(run, "build_trainer", with_signal)
    with pytest.raises(Preempted) as stopped:
        fit(tiny_recipe(tmp_path, checkpoint_every_n_steps=100))
    monkeypatch.undo()
    assert stopped.value.code == REQUEUE_EXIT_CODE and stopped.value.step == 3
    run_dir = tmp_path / "tiny" / "version_0"
    assert stopped.value.checkpoint == run_dir / "checkpoints" / "step0000003.ckpt"
    assert marker_path(stopped.value.checkpoint).is_file()

    fit(tiny_recipe(tmp_path, checkpoint_every_n_steps=100), resume="auto")
    assert not (tmp_path / "tiny" / "version_1").exists()
    assert_same_run(straight_dir, run_dir, from_step=3)
    sessions = json.loads((run_dir / "environment.json").read_text())
    assert sessions["resumed_from"].endswith("step0000003.ckpt") and len(sessions["earlier_sessions"]) == 1


def test_resume_last_continues_to_a_longer_run(straight, tmp_path):
    straight_dir, _ = straight
    shutil.copytree(straight_dir, tmp_path / "tiny" / "version_0")
    recipe = tiny_recipe(tmp_path)
    recipe.trainer.max_steps = 8
    fit(recipe, resume="last")
    checkpoint = torch.load(tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 8
    assert "rng_states" in checkpoint and checkpoint["nonfinite_guard"] == {"skipped": 0, "consecutive": 0}
    assert not (tmp_path / "tiny" / "version_1").exists()


def test_resume_auto_without_checkpoint_starts_fresh_and_last_refuses(tmp_path):
    logging_config = tiny_recipe(tmp_path).logging
    (tmp_path / "tiny" / "version_0" / "checkpoints").mkdir(parents=True)  # killed before its first checkpoint
    assert run.resolve_run(logging_config, "auto") == (tmp_path / "tiny" / "version_1", None)
    with pytest.raises(run.RecipeError, match="--resume last: no complete checkpoint"):
        run.resolve_run(logging_config, "last")
