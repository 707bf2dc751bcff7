"""trainer.cuda_graph: the loss and gradients replayed from CUDA graphs equal the eager ones, step after step."""

import pytest
import torch

from mambatrain.config.schema import AttentionConfig, MambaConfig, ModelConfig
from mambatrain.models.graphed import GraphedLoss
from mambatrain.models.lm import LanguageModel
from mambatrain.models.windowed import windowed_loss

VOCAB, LENGTH = 64, 384


def _model(kind: str) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(kind=kind, pattern="MAM" if kind == "hybrid" else None, d_model=64, n_layers=3,
                         vocab_size=VOCAB, mamba=MambaConfig(d_state=16, head_dim=16, chunk_size=64),
                         attention=AttentionConfig(n_heads=4))
    return LanguageModel(config)


def _loss(window):
    def loss(model, ids, labels, seq_idx):
        if window is not None:
            return windowed_loss(model, ids, labels, seq_idx, window, loss_chunk_size=100)
        return model.loss(model(ids, seq_idx), labels, chunk_size=100)
    return loss


def test_cpu_batches_run_eagerly():
    model = _model("mamba")
    ids = torch.randint(0, VOCAB, (1, 70))
    graphed = GraphedLoss(model, _loss(None))
    torch.testing.assert_close(graphed(ids, ids), _loss(None)(model, ids, ids, None))
    assert graphed._signature is None  # nothing captured


def _loss_and_grads(model, loss_fn):
    """(loss, parameter gradients) of one forward + backward; the autograd graph is gone on return (a live eager
    graph during a capture would make the captured backward wait on the default stream: see models/graphed.py)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        loss = loss_fn()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["mamba", "hybrid"])
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("documents", [False, True])
def test_replayed_loss_and_gradients_equal_eager(kind, window, documents):
    model = _model(kind).cuda()
    graphed = GraphedLoss(model, _loss(window))
    eager_loss = _loss(window)
    for step in range(3):  # fresh data each step: the replays must read the new batch, not the captured one
        ids = torch.randint(0, VOCAB, (2, LENGTH), device="cuda")
        seq_idx = (torch.arange(LENGTH, device="cuda") >= 100 + 50 * step).int().expand(2, -1).contiguous()
        seq_idx = seq_idx if documents else None
        loss_b, grads_b = _loss_and_grads(model, lambda: graphed(ids, ids, seq_idx))  # captured at step 0
        loss_a, grads_a = _loss_and_grads(model, lambda: eager_loss(model, ids, ids, seq_idx))
        # The same kernels on the same data: equal up to bf16 rounding of autocast's casts
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-3, atol=1e-3)
        for (name, _), a, b in zip(model.named_parameters(), grads_a, grads_b):
            assert ((b - a).norm() / a.norm().clamp(min=1e-12)) < 2e-2, f"step {step}: {name}"
        with torch.no_grad():  # the weights move between steps: the graph must see the new ones
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
    assert graphed._signature is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_other_shapes_run_eagerly(caplog):
    model = _model("mamba").cuda()
    graphed = GraphedLoss(model, _loss(None))
    ids = torch.randint(0, VOCAB, (1, LENGTH), device="cuda")
    graphed(ids, ids).backward()
    shorter = ids[:, :200]
    torch.testing.assert_close(graphed(shorter, shorter), _loss(None)(model, shorter, shorter, None))
    assert "runs eagerly" in caplog.text
