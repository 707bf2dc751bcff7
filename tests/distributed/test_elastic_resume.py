"""A run checkpointed on 2 gloo processes resumes on 1: weights, optimizer, schedule and step carry over; the data
goes on from where the 2 ranks were (synthetic: exactly, prepared: the rest of the epoch re-divided)."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from fit_helpers import TINY, logged, train

from mambatrain.config.load import load_recipe
from mambatrain.data.shards import prepare

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from corpus_helpers import write_corpus  # noqa: E402

EVERY_2 = {**TINY["trainer"], "checkpoint_every_n_steps": 2}


@pytest.mark.slow
def test_synthetic_run_resumed_on_one_process_equals_the_uninterrupted_run(tmp_path):
    # Same global batch (2 x 4 then 1 x 8) and the same numbered samples: the weights must match exactly.
    straight, _ = train(tmp_path, "straight", "--data.batch_size", "8")
    values = {**TINY, "trainer": EVERY_2}
    train(tmp_path, "elastic", "--trainer.devices", "2", "--trainer.strategy", "ddp", recipe_values=values)
    middle = tmp_path / "elastic" / "version_0" / "checkpoints" / "step0000002.ckpt"
    resumed, output = train(tmp_path, "elastic", "--resume", str(middle), "--data.batch_size", "8",
                            recipe_values=values)
    assert "written by 2 data-parallel ranks, this run has 1" in output and "continues at sample 16" in output
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)
    # The resumed run's steps continue the checkpoint's (Lightning logs a step under the count before it).
    assert logged(tmp_path, "elastic", "step")[-1] == logged(tmp_path, "straight", "step")[-1]


@pytest.mark.slow
def test_prepared_run_resumed_on_one_process_continues_with_the_rest_of_the_epoch(tmp_path):
    write_corpus(tmp_path / "corpus", n_files=2, docs_per_file=40)
    values = {**TINY, "model": {**TINY["model"], "vocab_size": 320}, "trainer": EVERY_2,
              "data": {"source": "prepared", "seq_len": 32, "batch_size": 2, "num_workers": 0,
                       "text": {"sources": [{"path": str(tmp_path / "corpus")}]},
                       "prepared": {"path": str(tmp_path / "shards")}}}
    prepare(load_recipe(values=copy.deepcopy(values)))  # load_recipe keeps parts of the dict it reads
    train(tmp_path, "prepared", "--trainer.devices", "2", "--trainer.strategy", "ddp", recipe_values=values)
    middle = tmp_path / "prepared" / "version_0" / "checkpoints" / "step0000002.ckpt"
    _, output = train(tmp_path, "prepared", "--resume", str(middle), recipe_values=values)
    assert "data layout changed: the checkpoint was written by 2 data-parallel ranks x 1 streams" in output
    assert "this run has 1 x 1" in output and "0 tokens skipped" in output
    final = torch.load(tmp_path / "prepared" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 4 and final["RecipeDataModule"]["data_parallel_ranks"] == 1
    steps = logged(tmp_path, "prepared", "step")
    assert max(steps) >= 3  # the resumed run logged steps 2 and 3 after the 2-rank run's 0 and 1
