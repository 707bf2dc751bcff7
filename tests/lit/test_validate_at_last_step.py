"""ValidateAtLastStep: the final validation inside fit, which FSDP runs need (a trainer.validate after fit runs the
model without its root FSDP unit)."""

import pytest

from mambatrain.config.load import load_recipe
from mambatrain.lit.callbacks import ValidateAtLastStep

from conftest import fit_with_callback

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "model": {"kind": "mamba", "d_model": 32, "n_layers": 2, "vocab_size": 32,
              "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 64}},
    "data": {"source": "markov", "seq_len": 32, "batch_size": 2},
    "scheduler": {"warmup_steps": 1},
    "trainer": {"max_steps": 5, "checkpoint_every_n_steps": 100, "val_every_n_steps": 2, "log_every_n_steps": 1,
                "limit_val_batches": 1},
}


class ValidationSteps(ValidateAtLastStep):
    """ValidateAtLastStep, recording the optimizer step of every validation inside fit."""

    def __init__(self):
        self.steps = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self.steps.append(trainer.global_step)


@pytest.mark.parametrize("max_steps, accumulate", [(5, 1), (4, 1), (3, 2)])
def test_the_last_step_is_validated_once_inside_fit(tmp_path, monkeypatch, max_steps, accumulate):
    trainer = {**TINY["trainer"], "max_steps": max_steps, "accumulate_grad_batches": accumulate}
    recipe = load_recipe(values={**TINY, "trainer": trainer, "logging": {"root_dir": str(tmp_path), "run_name": "v"}})
    seen = ValidationSteps()
    fit_with_callback(recipe, seen, monkeypatch)
    every_second = list(range(2, max_steps + 1, 2))
    assert seen.steps == every_second + ([max_steps] if max_steps % 2 else [])
