"""FSDP cannot run on CPU (Lightning and torch both refuse it), so these tests check what the recipe asks of it:
full state dicts (checkpoints load on any rank count, in `export` and as finetune.init_from), one unit per block."""

import pytest
from fit_helpers import TINY

from mambatrain.config.load import load_recipe
from mambatrain.config.schema import RecipeError
from mambatrain.distributed.strategy import build_strategy
from mambatrain.models.block import Block


def fsdp_recipe(accelerator="gpu"):
    return load_recipe(values={**TINY, "trainer": {**TINY["trainer"], "accelerator": accelerator, "devices": 2,
                                                    "strategy": "fsdp"}})


def test_fsdp_checkpoints_are_full_state_dicts_wrapped_per_block():
    strategy = build_strategy(fsdp_recipe())
    assert strategy._state_dict_type == "full"  # one file, gathered on rank 0: loads on any number of ranks
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert str(strategy.sharding_strategy) == "ShardingStrategy.FULL_SHARD"


def test_fsdp_on_cpu_is_refused_naming_the_key():
    with pytest.raises(RecipeError, match="^trainer.strategy: fsdp needs GPUs"):
        fsdp_recipe("cpu")
