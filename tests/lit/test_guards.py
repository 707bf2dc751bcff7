"""NaN/Inf steps are skipped and counted, too many in a row stop the run naming where; SSM numerics stay fp32."""

import csv
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from mambatrain.config.load import load_recipe
from mambatrain.lit.guards import NonFiniteGuard, NonFiniteStop, first_nonfinite_output, ssm_statistics
from mambatrain.models import scan
from mambatrain.models.lm import LanguageModel

from conftest import fit_with_callback

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "model": {"kind": "hybrid", "d_model": 32, "n_layers": 2, "vocab_size": 32, "pattern": "MA",
              "mamba": {"d_state": 8, "head_dim": 8, "chunk_size": 64}, "attention": {"n_heads": 4}},
    "data": {"seq_len": 32, "batch_size": 4, "mqar": {"num_kv_pairs": 4, "val_samples": 8}},
    "trainer": {"max_steps": 8, "accumulate_grad_batches": 2, "checkpoint_every_n_steps": 100,
                "max_consecutive_nonfinite": 2, "val_every_n_steps": 100, "log_every_n_steps": 1,
                "limit_val_batches": 1},
}



class Poison(L.Callback):
    """Makes the attention block's output NaN during the steps ``poisoned`` (0-based global_step), and records
    the weights and optimizer step counts at the start of every step."""

    def __init__(self, poisoned):
        self.poisoned, self.active, self.snapshots = poisoned, False, {}

    def on_train_start(self, trainer, pl_module):
        pl_module.model.blocks[1].register_forward_hook(lambda m, i, out: out * float("nan") if self.active else out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = trainer.global_step in self.poisoned
        if trainer.global_step not in self.snapshots:
            state = trainer.optimizers[0].state
            steps = [float(s["step"]) for s in state.values()] if state else []
            self.snapshots[trainer.global_step] = ({k: v.clone() for k, v in pl_module.state_dict().items()}, steps)


def test_nonfinite_steps_are_skipped_counted_then_stop_the_run(tmp_path, monkeypatch):
    poison = Poison(poisoned={1, 3, 4})
    recipe = load_recipe(values={**TINY, "logging": {"root_dir": str(tmp_path), "run_name": "nan"}})
    with pytest.raises(NonFiniteStop) as stopped:
        fit_with_callback(recipe, poison, monkeypatch)

    # Step 1 (0-based) was skipped: nothing changed, not even AdamW's step counts. Step 2 trained again.
    before, after, later = poison.snapshots[1], poison.snapshots[2], poison.snapshots[3]
    for name in before[0]:
        torch.testing.assert_close(before[0][name], after[0][name], rtol=0, atol=0, msg=name)
    assert before[1] == after[1] and later[1] != after[1]
    assert any(not torch.equal(after[0][n], later[0][n]) for n in after[0])

    # Steps 3 and 4 (4 and 5 counted from 1) in a row: the limit of 2 is reached at step 5.
    message = str(stopped.value)
    assert stopped.value.code == message and "\n" not in message
    assert message.startswith("training stopped: 2 optimizer steps in a row had a NaN/Inf loss or gradient")
    assert "steps 4-5" in message and "at step 5" in message
    assert "micro-batch 8 of the run" in message  # step 5's first micro-batch: 4 steps x 2 micro-batches before it
    assert "first non-finite output: blocks.1 (layer 1, attention)" in message

    with open(tmp_path / "nan" / "version_0" / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    skipped = [float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")]
    assert skipped[:3] == [0.0, 1.0, 1.0] and max(skipped) >= 2
    assert any(r.get("ssm/layer0/dt_mean") for r in rows) and not any("ssm/layer1" in k for k in rows[0])


def test_first_nonfinite_output_names_the_innermost_module():
    model = LanguageModel(load_recipe(values=TINY).model)
    with torch.no_grad():
        model.blocks[0].mixer.out_proj.weight[0, 0] = float("inf")
    ids = torch.randint(0, 32, (2, 16))
    assert first_nonfinite_output(model, lambda: model(ids)) == "blocks.0.mixer.out_proj"
    with torch.no_grad():
        model.blocks[0].mixer.out_proj.weight[0, 0] = 0.0
    assert first_nonfinite_output(model, lambda: model(ids)) is None


class FakeModule:
    """Just enough of a LightningModule for NonFiniteGuard.check on one rank of two."""

    def __init__(self, other_rank_bad: bool):
        self.model = torch.nn.Linear(2, 2)
        self.model.weight.grad = torch.ones(2, 2)
        self.device = torch.device("cpu")
        self.logged = {}
        reduce = lambda flag, reduce_op: flag + float(other_rank_bad)  # noqa: E731 (a sum over two ranks)
        self.trainer = SimpleNamespace(world_size=2, global_step=0, strategy=SimpleNamespace(reduce=reduce))

    def parameters(self):
        return self.model.parameters()

    def log(self, name, value):
        self.logged[name] = value


@pytest.mark.parametrize("other_rank_bad", [False, True])
def test_ranks_skip_together(other_rank_bad):
    guard, module = NonFiniteGuard(max_consecutive=3), FakeModule(other_rank_bad)
    guard.observe(torch.tensor(1.0), batch={})
    assert guard.check(module, torch.tensor(2.0)) is other_rank_bad
    assert (module.model.weight.grad is None) is other_rank_bad
    assert module.logged["train/skipped_steps"] == float(other_rank_bad)


def test_ssm_statistics_per_mamba_layer():
    model = LanguageModel(load_recipe(values={**TINY, "model": {**TINY["model"], "pattern": "AM"}}).model)
    stats = ssm_statistics(model)
    assert sorted(stats) == sorted(f"ssm/layer1/{k}" for k in ("dt_mean", "dt_max", "A_mean", "A_min", "A_max"))
    mixer = model.blocks[1].mixer
    assert stats["ssm/layer1/dt_max"] == pytest.approx(F.softplus(mixer.dt_bias).max().item())
    assert stats["ssm/layer1/A_min"] == pytest.approx(-torch.exp(mixer.A_log).max().item())


@pytest.mark.parametrize("version,scan_name", [(1, "selective_scan"), (2, "ssd_scan")])
def test_ssm_parameters_and_scan_inputs_stay_float32_under_autocast(monkeypatch, version, scan_name):
    model_config = {**TINY["model"], "mamba": {**TINY["model"]["mamba"], "version": version}}
    model = LanguageModel(load_recipe(values={**TINY, "model": model_config}).model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = {}
    original = getattr(scan, scan_name)

    def spy(backend, x, dt, A, *args, **kwargs):
        seen.update(A=A.dtype, D=kwargs["D"].dtype, dt_bias=kwargs["dt_bias"].dtype, x=x.dtype)
        return original(backend, x, dt, A, *args, **kwargs)

    monkeypatch.setattr(scan, scan_name, spy)
    ids = torch.randint(0, 32, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what precision: bf16-mixed does
        loss = model.loss(model(ids), ids)
    loss.backward()
    optimizer.step()
    assert seen["x"] == torch.bfloat16  # the activations do run in bf16 ...
    assert seen["A"] == seen["D"] == seen["dt_bias"] == torch.float32  # ... the SSM's decay and step size do not
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_skip_warning_says_what_was_bad(caplog):
    guard, module = NonFiniteGuard(max_consecutive=3), FakeModule(other_rank_bad=False)
    for loss in (1.0, float("nan"), 2.0):
        guard.observe(torch.tensor(loss), batch={})
    with caplog.at_level("WARNING", logger="mambatrain"):
        assert guard.check(module, torch.tensor(2.0))
    assert "step 1: non-finite loss in micro-batch 2 of 3, optimizer step skipped" in caplog.text
    module.model.weight.grad = torch.full((2, 2), float("inf"))
    guard.observe(torch.tensor(1.0), batch={})
    with caplog.at_level("WARNING", logger="mambatrain"):
        assert guard.check(module, torch.tensor(float("inf")))
    assert "non-finite gradient (first: weight)" in caplog.text

