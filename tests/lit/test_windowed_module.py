"""trainer.sequence_window changes how the loss is computed, not its value."""

import dataclasses

import torch

from mambatrain.config.load import load_recipe
from mambatrain.lit.module import LanguageModelModule


def test_module_loss_is_the_same_with_windows(quickstart_recipe):
    recipe = load_recipe(quickstart_recipe)
    module = LanguageModelModule(recipe)
    tokens = torch.randint(0, recipe.model.vocab_size, (2, 64))
    batch = {"input_ids": tokens, "labels": tokens.roll(-1, 1)}
    whole, hidden = module._loss(batch)
    module.recipe = dataclasses.replace(recipe, trainer=dataclasses.replace(recipe.trainer, sequence_window=24))
    windowed, no_hidden = module._loss(batch)
    assert hidden is not None and no_hidden is None
    torch.testing.assert_close(windowed, whole, rtol=1e-5, atol=1e-6)


def test_windowed_validation_logs_accuracy(quickstart_recipe):
    recipe = load_recipe(quickstart_recipe)
    module = LanguageModelModule(recipe)
    tokens = torch.randint(0, recipe.model.vocab_size, (2, 64))
    batch = {"input_ids": tokens, "labels": tokens.roll(-1, 1)}
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    with torch.no_grad():
        module.validation_step(batch, 0)
        whole = dict(logged)
        module.recipe = dataclasses.replace(recipe, trainer=dataclasses.replace(recipe.trainer, sequence_window=24))
        module.validation_step(batch, 0)
    assert set(logged) == set(whole) and "val/accuracy" in logged
    assert logged["val/accuracy"] == whole["val/accuracy"]
    assert abs(logged["val/loss"] - whole["val/loss"]) < 1e-5
