"""`mambatrain fit` on a tiny local jsonl: trains end to end, and a resumed run sees the same following batches."""

import csv
import shutil
import subprocess
import sys

import pytest
import torch

from mambatrain.config.load import load_recipe
from mambatrain.run import fit

from corpus_helpers import write_corpus

REPO_RECIPE = "recipes/pretrain/text-small.yaml"


def tiny(tmp_path, root):
    return load_recipe(values={
        "model": {"kind": "hybrid", "d_model": 32, "n_layers": 2, "vocab_size": 320, "pattern": "MA", "d_mlp": 32,
                  "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 64}, "attention": {"n_heads": 4}},
        "data": {"source": "text", "seq_len": 96, "batch_size": 2, "num_workers": 2,
                 "text": {"sources": [{"path": str(tmp_path / "corpus")}]}},
        "scheduler": {"warmup_steps": 2},
        "trainer": {"max_steps": 6, "checkpoint_every_n_steps": 3, "val_every_n_steps": 100, "log_every_n_steps": 1,
                    "limit_val_batches": 1, "accumulate_grad_batches": 1},
        "logging": {"root_dir": str(root), "run_name": "text"},
    })


def train_losses(run_dir) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


def test_resumed_text_run_matches_uninterrupted_run(tmp_path):
    write_corpus(tmp_path / "corpus", n_files=2, docs_per_file=40)
    fit(tiny(tmp_path, tmp_path / "straight"))
    straight_dir = tmp_path / "straight" / "text" / "version_0"
    checkpoint = torch.load(straight_dir / "checkpoints" / "step0000003.ckpt", weights_only=False)
    position = checkpoint["RecipeDataModule"]  # the datamodule state_dict, as Lightning saves it
    assert position["batches_consumed"] == 3 and len(position["streams"][0]) == 2

    resumed_dir = tmp_path / "resumed" / "text" / "version_0"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    middle = resumed_dir / "checkpoints" / "step3.ckpt"
    shutil.copy(straight_dir / "checkpoints" / "step0000003.ckpt", middle)
    fit(tiny(tmp_path, tmp_path / "resumed"), resume=str(middle))

    a = torch.load(straight_dir / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    for name in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][name], b["state_dict"][name], rtol=1e-6, atol=1e-7, msg=name)
    assert a["RecipeDataModule"] == b["RecipeDataModule"]  # the same data position at the end
    straight_losses, resumed_losses = train_losses(straight_dir), train_losses(resumed_dir)
    for step in (3, 4, 5):
        assert abs(straight_losses[step] - resumed_losses[step]) < 1e-6


@pytest.mark.slow
def test_cli_fits_the_shipped_text_recipe_on_a_tiny_jsonl(tmp_path):
    write_corpus(tmp_path / "corpus", n_files=1, docs_per_file=30)
    args = [sys.executable, "-m", "mambatrain", "fit", REPO_RECIPE,
            "--data.text.sources", f"[{{path: {tmp_path / 'corpus' / 'part0.jsonl'}}}]",
            "--data.seq_len", "128", "--model.d_model", "32", "--model.d_mlp", "32", "--model.mamba.d_state", "8",
            "--model.mamba.head_dim", "16", "--trainer.max_steps", "3", "--trainer.val_every_n_steps", "3",
            "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
            "--logging.root_dir", str(tmp_path / "runs")]
    from conftest import REPO
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final validation after 3 steps" in result.stdout + result.stderr
    assert "val_sources is empty" in result.stdout + result.stderr  # the validation-on-training-data warning
