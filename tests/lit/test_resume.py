"""A run resumed from a mid-training checkpoint ends exactly where an uninterrupted run ends."""

import csv
import shutil

import torch

from mambatrain.config.load import load_recipe
from mambatrain.run import fit

TINY = {
    "model": {"kind": "hybrid", "d_model": 32, "n_layers": 2, "vocab_size": 32, "pattern": "MA", "d_mlp": 32,
              "mamba": {"d_state": 8, "head_dim": 8}, "attention": {"n_heads": 4}},
    "data": {"seq_len": 32, "batch_size": 4, "mqar": {"num_kv_pairs": 4, "val_samples": 8}},
    "scheduler": {"warmup_steps": 2},
    "trainer": {"max_steps": 6, "checkpoint_every_n_steps": 3, "val_every_n_steps": 100, "log_every_n_steps": 1,
                "limit_val_batches": 2},
}


def tiny_recipe(root, **logging):
    return load_recipe(values={**TINY, "logging": {"root_dir": str(root), "run_name": "tiny", **logging}})


def train_losses(run_dir) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = fit(tiny_recipe(tmp_path / "straight"))
    straight_dir = tmp_path / "straight" / "tiny" / "version_0"

    # A run preempted after its step-3 checkpoint: only that file survives.
    resumed_dir = tmp_path / "resumed" / "tiny" / "version_0"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    middle = resumed_dir / "checkpoints" / "step3.ckpt"
    shutil.copy(straight_dir / "checkpoints" / "step0000003.ckpt", middle)
    resumed = fit(tiny_recipe(tmp_path / "resumed"), resume=str(middle))

    a, b = final_weights(straight_dir), final_weights(resumed_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    straight_losses, resumed_losses = train_losses(straight_dir), train_losses(resumed_dir)
    for step in (4, 5):  # Lightning logs a step's loss under the step count before it
        assert abs(straight_losses[step] - resumed_losses[step]) < 1e-6
    assert abs(straight["val/loss"] - resumed["val/loss"]) < 1e-6


def test_resume_last_picks_newest_checkpoint(tmp_path):
    fit(tiny_recipe(tmp_path))
    recipe = tiny_recipe(tmp_path)
    recipe.trainer.max_steps = 8
    fit(recipe, resume="last")
    checkpoint = torch.load(tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 8
    assert "rng_states" in checkpoint
    assert not (tmp_path / "tiny" / "version_1").exists()
