"""ValidateAtLastStep: the final validation inside fit, which FSDP runs need (a trainer.validate after fit runs the
model without its root FSDP unit)."""

import pytest

from mambatrain.config.load import load_recipe
from mambatrain.lit.callbacks import ValidateAtLastStep

from conftest import TINY_MAMBA, fit_with_callback

pytestmark = pytest.mark.usefixtures("one_thread")


class ValidationSteps(ValidateAtLastStep):
    """ValidateAtLastStep, recording the optimizer step of every validation inside fit."""

    def __init__(self):
        self.steps = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self.steps.append(trainer.global_step)


@pytest.mark.parametrize("max_steps, accumulate", [(5, 1), (4, 1), (3, 2)])
def test_the_last_step_is_validated_once_inside_fit(tmp_path, monkeypatch, max_steps, accumulate):
    trainer = {**TINY_MAMBA["trainer"], "max_steps": max_steps, "val_every_n_steps": 2,
               "accumulate_grad_batches": accumulate}
    recipe = load_recipe(values={**TINY_MAMBA, "trainer": trainer,
                                 "logging": {"root_dir": str(tmp_path), "run_name": "v"}})
    seen = ValidationSteps()
    fit_with_callback(recipe, seen, monkeypatch)
    every_second = list(range(2, max_steps + 1, 2))
    assert seen.steps == every_second + ([max_steps] if max_steps % 2 else [])
