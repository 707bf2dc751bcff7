"""Two CPU processes (gloo) under DDP train exactly like one process on the same global batch."""

import subprocess
import sys

import pytest
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


def train(tmp_path, name, *overrides):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "logging": {"root_dir": str(tmp_path), "run_name": name}}))
    result = subprocess.run([sys.executable, "-m", "mambatrain", "fit", str(recipe), *overrides],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    return checkpoint["state_dict"], result.stdout + result.stderr


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    single, _ = train(tmp_path, "single", "--data.batch_size", "8")
    ddp, output = train(tmp_path, "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert "global batch: 8 sequences" in output
    assert not (tmp_path / "ddp" / "version_1").exists()  # both ranks wrote into one run directory
    assert (tmp_path / "ddp" / "version_0" / "logs" / "metrics.csv").is_file()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6, msg=name)


def test_several_devices_need_a_strategy(tmp_path):
    from mambatrain.config.load import load_recipe
    from mambatrain.config.schema import RecipeError
    with pytest.raises(RecipeError, match="trainer.strategy"):
        load_recipe(values={**TINY, "trainer": {**TINY["trainer"], "devices": 2}})
