"""A tiny recipe and a `mambatrain fit` subprocess, shared by the multi-process training tests."""

import csv
import subprocess
import sys

import torch
import yaml

TINY = {
    "model": {"kind": "hybrid", "d_model": 32, "n_layers": 2, "vocab_size": 32, "pattern": "MA", "d_mlp": 32,
              "mamba": {"d_state": 8, "head_dim": 8}, "attention": {"n_heads": 4}},
    "data": {"seq_len": 32, "batch_size": 4, "mqar": {"num_kv_pairs": 4, "val_samples": 16}},
    "scheduler": {"warmup_steps": 2},
    "trainer": {"max_steps": 4, "accelerator": "cpu", "checkpoint_every_n_steps": 100, "val_every_n_steps": 100,
                "log_every_n_steps": 1, "limit_val_batches": 1},
}


def train(tmp_path, name, *overrides, recipe_values=None):
    """Runs `mambatrain fit` on TINY (or ``recipe_values``); returns the final state dict and the output."""
    recipe = tmp_path / f"{name}.yaml"
    values = recipe_values or TINY
    recipe.write_text(yaml.safe_dump({**values, "logging": {"root_dir": str(tmp_path), "run_name": name}}))
    result = subprocess.run([sys.executable, "-m", "mambatrain", "fit", str(recipe), *overrides],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    return checkpoint["state_dict"], result.stdout + result.stderr


def logged(tmp_path, name, key) -> list[float]:
    """Every value the run logged under ``key`` (metrics.csv of the CSV logger), in order."""
    with open(tmp_path / name / "version_0" / "logs" / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
