"""The command line as a user meets it: help, printed recipes, one-line errors, a short real run."""

import subprocess
import sys

import pytest
import yaml

from conftest import REPO

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")


def mambatrain(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mambatrain", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_help_lists_commands_and_recipe_keys():
    top = mambatrain("--help")
    assert top.returncode == 0 and "mambatrain fit" in top.stdout
    fit_help = mambatrain("fit", "--help")
    assert fit_help.returncode == 0
    assert "--model.d_model" in fit_help.stdout and "Width of the residual stream" in fit_help.stdout


def test_print_config_shows_resolved_pattern(tmp_path):
    result = mambatrain("fit", QUICKSTART, "--print-config", "--model.pattern", "null",
                        "--model.attention_ratio", "0.25")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["pattern"] == "MMAM"
    assert printed["trainer"]["gradient_clip"] == 1.0  # a default the recipe does not mention


@pytest.mark.parametrize("override,key", [
    (["--model.d_modle", "64"], "model.d_modle"),
    (["--data.batch_size", "lots"], "data.batch_size"),
    (["--model.attention.n_heads", "3"], "model.attention.n_heads"),
    (["--trainer.max_steps", "-5"], "trainer.max_steps"),
])
def test_bad_recipe_fails_with_one_line_naming_the_key(override, key):
    result = mambatrain("fit", QUICKSTART, *override)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"recipe error: {key}:"), result.stderr
    assert "Traceback" not in result.stderr


def test_missing_section_fails_before_training(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  seq_len: 64\n")
    result = mambatrain("fit", str(recipe))
    assert result.returncode == 2 and result.stderr.startswith("recipe error: model: missing section")


@pytest.mark.slow
def test_quickstart_runs_and_writes_a_run_directory(tmp_path):
    result = mambatrain("fit", QUICKSTART, "--trainer.max_steps", "4", "--trainer.val_every_n_steps", "2",
                        "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--logging.root_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "M blocks" in output and "A blocks" in output
    assert "final validation after 4 steps" in output
    run_dir = tmp_path / "quickstart" / "version_0"
    assert (run_dir / "recipe.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = (run_dir / "logs" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "train/tokens_per_sec" in metrics
