"""Two CPU processes (gloo) under DDP train exactly like one process on the same global batch."""

import pytest
import torch
from fit_helpers import TINY, train


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    single, _ = train(tmp_path, "single", "--data.batch_size", "8")
    ddp, output = train(tmp_path, "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert "global batch: 8 sequences" in output
    assert not (tmp_path / "ddp" / "version_1").exists()  # both ranks wrote into one run directory
    assert (tmp_path / "ddp" / "version_0" / "logs" / "metrics.csv").is_file()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6, msg=name)


def test_several_devices_need_a_strategy(tmp_path):
    from mambatrain.config.load import load_recipe
    from mambatrain.config.schema import RecipeError
    with pytest.raises(RecipeError, match="trainer.strategy"):
        load_recipe(values={**TINY, "trainer": {**TINY["trainer"], "devices": 2}})
