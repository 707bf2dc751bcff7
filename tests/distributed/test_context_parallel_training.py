"""`trainer.context_parallel` in the training loop: CPU processes (gloo) that split each sequence train exactly
like one process on the whole sequences."""

import copy

import pytest
import torch
from fit_helpers import TINY, logged, train

from mambatrain.config.load import load_recipe
from mambatrain.config.schema import RecipeError
from mambatrain.lit.callbacks import ThroughputMonitor

MAMBA2 = copy.deepcopy(TINY)
MAMBA2["model"].update(kind="mamba", pattern=None, d_mlp=0)
CP2 = ("--trainer.strategy", "ddp", "--trainer.context_parallel", "2")


def assert_same_training(tmp_path, got: dict, expected: dict, name: str,
                         keys=("train/grad_norm", "train/loss", "val/loss", "val/accuracy")) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)
    # AdamW barely sees a wrong gradient scale in the weights; the logged gradient norm does (the loss handed to
    # DDP's backward is scaled by the group size), and the logged losses and accuracy are the global ones.
    for key in keys:
        single = logged(tmp_path, "single", key)
        assert single, key
        torch.testing.assert_close(torch.tensor(logged(tmp_path, name, key)), torch.tensor(single), rtol=1e-5,
                                   atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("values", [MAMBA2, TINY], ids=["mamba2", "hybrid"])
def test_context_parallel_on_two_processes_equals_one_process_on_whole_sequences(tmp_path, values):
    single, _ = train(tmp_path, "single", recipe_values=values)
    split, output = train(tmp_path, "cp", "--trainer.devices", "2", *CP2, recipe_values=values)
    assert "global batch: 4 sequences x 32 tokens" in output
    assert "1 data-parallel ranks), each sequence split over 2 context-parallel ranks" in output
    assert_same_training(tmp_path, split, single, "cp")


@pytest.mark.slow
def test_context_parallel_times_data_parallel_equals_one_process_on_the_global_batch(tmp_path):
    # Ranks 0-1 split the sequences of data-parallel replica 0, ranks 2-3 those of replica 1.
    single, _ = train(tmp_path, "single", "--data.batch_size", "8")
    split, output = train(tmp_path, "cpdp", "--trainer.devices", "4", *CP2)
    assert "global batch: 8 sequences" in output
    # train/loss is rank 0's, i.e. replica 0's half of the batch (as under plain DDP): not compared.
    assert_same_training(tmp_path, split, single, "cpdp", keys=("train/grad_norm", "val/loss", "val/accuracy"))


def with_trainer(**trainer):
    return {**TINY, "trainer": {**TINY["trainer"], **trainer}}


@pytest.mark.parametrize("trainer, message", [
    ({"devices": 3, "strategy": "ddp", "context_parallel": 2}, "does not divide the 3 ranks"),
    ({"devices": 2, "strategy": "fsdp", "context_parallel": 2}, "needs strategy: ddp"),
    ({"devices": 2, "strategy": "ddp", "context_parallel": 2, "activation_checkpointing": "M"},
     "activation_checkpointing"),
    ({"devices": 4, "strategy": "ddp", "context_parallel": 4, "max_steps": 1}, None),  # seq_len 32 splits in 4
    ({"context_parallel": 0}, "must be positive"),
])
def test_context_parallel_combinations_that_cannot_work_name_the_key(trainer, message):
    if message is None:
        load_recipe(values=with_trainer(**trainer))
        return
    with pytest.raises(RecipeError, match=f"trainer.context_parallel: .*{message}"):
        load_recipe(values=with_trainer(**trainer))


def test_sequence_length_must_split_evenly():
    values = with_trainer(devices=2, strategy="ddp", context_parallel=2)
    values["data"] = {**values["data"], "seq_len": 33}
    with pytest.raises(RecipeError, match="trainer.context_parallel: data.seq_len 33 does not split evenly"):
        load_recipe(values=values)


def test_throughput_counts_each_token_once_over_the_group():
    recipe = load_recipe(values=with_trainer(devices=4, strategy="ddp", context_parallel=2))
    # Per rank: its slice (batch 4 x 32 / 2); the monitor multiplies by the 4 ranks -> 2 replicas x 4 x 32.
    assert ThroughputMonitor.from_recipe(recipe).tokens_per_batch == 4 * 32 // 2
