"""trainer.gradient_clip: the module clips with the norm it logs, under every precision and with fused AdamW
(Lightning's own clipping refuses a fused optimizer under mixed precision, and FSDP)."""

import lightning as L
import pytest
import torch

from mambatrain.config.load import load_recipe
from mambatrain.lit.module import clip_gradients, gradient_norm

from conftest import TINY_MAMBA, fit_with_callback

pytestmark = pytest.mark.usefixtures("one_thread")


class StepGradients(L.Callback):
    """The gradients the optimizer stepped with (after clipping), and whether its AdamW was fused."""

    def __init__(self):
        self.norms, self.fused = [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # after the step, before zero_grad
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.fused = trainer.optimizers[0].defaults["fused"]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_clips_the_gradients_it_steps_with(tmp_path, monkeypatch, precision):
    trainer = {**TINY_MAMBA["trainer"], "precision": precision, "gradient_clip": 1e-3}
    recipe = load_recipe(values={**TINY_MAMBA, "trainer": trainer,
                                 "logging": {"root_dir": str(tmp_path), "run_name": "clip"}})
    seen = StepGradients()
    # crashed at the first step under bf16-mixed while Lightning clipped for a fused AdamW
    fit_with_callback(recipe, seen, monkeypatch)
    assert seen.fused
    assert len(seen.norms) == 3
    assert all(norm == pytest.approx(1e-3, rel=1e-3) for norm in seen.norms)  # an untrained model's norm is >> 1e-3


def test_gradient_norm_and_clip_match_torch():
    torch.manual_seed(0)
    grads = [torch.randn(5, 7), torch.randn(3), torch.randn(2, 2, 2)]
    expected = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
    for p, g in zip(params, expected):
        p.grad = g
    expected_norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
    norm = gradient_norm(grads)
    assert torch.allclose(norm, expected_norm)
    clip_gradients(grads, norm, 0.5)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want)
    assert gradient_norm([]) is None
