"""Every recipe shipped in recipes/ loads, and its model builds at full size (on the meta device)."""

import pytest
import torch

from mambatrain.config.load import load_recipe
from mambatrain.models.lm import LanguageModel
from mambatrain.plan import describe_plan

from conftest import RECIPES

ALL_RECIPES = sorted(RECIPES.rglob("*.yaml"))


def test_there_are_recipes():
    assert ALL_RECIPES


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_loads_and_builds(path):
    recipe = load_recipe(path)
    with torch.device("meta"):
        model = LanguageModel(recipe.model)
    counts = model.parameter_counts()
    assert counts["total"] > 0
    assert len(model.blocks) == recipe.model.n_layers


@pytest.mark.parametrize("path", sorted((RECIPES / "long").glob("*.yaml")), ids=lambda p: p.name)
def test_long_recipes_fit_an_80_gb_gpu(path):
    """The 1M-token recipes promise one 80 GB GPU: plan must agree (with the headroom the benchmarks keep)."""
    _, fits = describe_plan(load_recipe(path), gpu_memory_gib=0.8 * 80)
    assert fits
