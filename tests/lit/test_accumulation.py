"""trainer.accumulate_grad_batches: k micro-batches make the optimizer step (gradient and logged loss) of their
concatenated batch, when every micro-batch has as many labelled tokens (markov: all of them)."""

import csv

import lightning as L
import pytest
import torch

from mambatrain.config.load import load_recipe

from conftest import fit_with_callback

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "model": {"kind": "hybrid", "d_model": 32, "n_layers": 2, "vocab_size": 32, "pattern": "MA", "d_mlp": 32,
              "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 64}, "attention": {"n_heads": 4}},
    "data": {"source": "markov", "seq_len": 32},
    "scheduler": {"warmup_steps": 1},
    "trainer": {"max_steps": 2, "gradient_clip": 0, "checkpoint_every_n_steps": 100, "val_every_n_steps": 100,
                "log_every_n_steps": 1, "limit_val_batches": 1},
}


class Gradients(L.Callback):
    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def fit_steps(root, monkeypatch, batch_size, **trainer):
    recipe = load_recipe(values={**TINY, "data": {**TINY["data"], "batch_size": batch_size},
                                 "trainer": {**TINY["trainer"], **trainer},
                                 "logging": {"root_dir": str(root), "run_name": "acc"}})
    gradients = Gradients()
    fit_with_callback(recipe, gradients, monkeypatch)
    with open(root / "acc" / "version_0" / "logs" / "metrics.csv") as f:
        losses = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    return gradients.steps, losses


def test_accumulated_step_is_the_step_of_the_whole_batch(tmp_path, monkeypatch):
    whole_grads, whole_losses = fit_steps(tmp_path / "whole", monkeypatch, batch_size=4)
    # Two micro-batches of 2 rows, each run window by window: samples 0-3 again, in the same order.
    micro_grads, micro_losses = fit_steps(tmp_path / "micro", monkeypatch, batch_size=2, accumulate_grad_batches=2,
                                          sequence_window=12)
    assert len(whole_grads) == len(micro_grads) == 2
    for whole, micro in zip(whole_grads, micro_grads):  # step 2's gradients also check step 1's update
        assert whole.keys() == micro.keys()
        for name in whole:
            torch.testing.assert_close(micro[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)
    # The logged train/loss of a step is the mean over its micro-batches, not the last micro-batch's loss.
    assert whole_losses.keys() == micro_losses.keys() == {0, 1}
    for step in whole_losses:
        assert abs(micro_losses[step] - whole_losses[step]) < 1e-5, (step, micro_losses, whole_losses)
