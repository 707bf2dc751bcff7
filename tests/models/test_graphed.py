"""trainer.cuda_graph: the loss and gradients replayed from CUDA graphs equal the eager ones, step after step."""

import warnings

import pytest
import torch

from mambatrain.config.schema import AttentionConfig, MambaConfig, ModelConfig
from mambatrain.models.graphed import GraphedLoss, copy_first_gradients
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


def test_out_of_memory_during_capture_is_named(monkeypatch):
    """CUDA reports an out-of-memory abort of a capture as 'capturing stream has unjoined work': the error must
    say memory, and what to change."""
    def capture_that_runs_out(*args, **kwargs):
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 786.00 MiB.")
        except torch.OutOfMemoryError:
            raise RuntimeError("CUDA error: capturing stream has unjoined work")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture_that_runs_out)
    monkeypatch.setattr(GraphedLoss, "_warm_up", lambda self, static: None)
    graphed = GraphedLoss(_model("mamba"), _loss(None))
    with pytest.raises(RuntimeError, match="ran out of memory while capturing.*trainer.sequence_window"):
        graphed._capture((torch.zeros(1, 8, dtype=torch.long),) * 2)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replays_accumulate_gradients_on_their_own_stream():
    """Nothing of the capture keeps the parameters' gradient accumulators made on its stream, so a replay's
    backward adds into .grad on its own stream, without torch's cross-stream warning (and synchronization)."""
    model = _model("mamba").cuda()
    graphed = GraphedLoss(model, _loss(None))
    ids = torch.randint(0, VOCAB, (1, LENGTH), device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            graphed(ids, ids).backward()
        torch.cuda.synchronize()
    assert not [w for w in caught if "stream does not match" in str(w.message)]


class _FixedBufferGradient(torch.autograd.Function):
    """(w * x).sum() whose backward writes w's gradient into one fixed buffer and hands out a detached view of
    it, as a replayed CUDA graph's backward does (torch.cuda.make_graphed_callables)."""

    buffer: torch.Tensor

    @staticmethod
    def forward(ctx, w, x):
        ctx.save_for_backward(x)
        return (w * x).sum()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        _FixedBufferGradient.buffer.copy_(grad * x)
        return _FixedBufferGradient.buffer.detach(), None


def test_accumulated_gradients_survive_a_backward_that_reuses_its_buffer():
    # Without the copy, autograd makes the first gradient .grad itself (it is unshared), the second backward
    # overwrites that buffer and then adds it to itself: 2 x the second gradient instead of the sum.
    w = torch.nn.Parameter(torch.ones(3))
    _FixedBufferGradient.buffer = torch.zeros(3)
    hooks = copy_first_gradients([w])
    xs = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])]
    for x in xs:
        _FixedBufferGradient.apply(w, x).backward()
    torch.testing.assert_close(w.grad, xs[0] + xs[1])
    assert w.grad.data_ptr() != _FixedBufferGradient.buffer.data_ptr()
    w.grad = None  # the next step starts over: its first gradient is copied again
    _FixedBufferGradient.apply(w, xs[1]).backward()
    _FixedBufferGradient.apply(w, xs[0]).backward()
    torch.testing.assert_close(w.grad, xs[0] + xs[1])
    for hook in hooks:
        hook.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replayed_gradients_accumulate_over_micro_batches():
    model = _model("mamba").cuda()
    graphed = GraphedLoss(model, _loss(None), accumulate_gradients=True)
    batches = [torch.randint(0, VOCAB, (1, LENGTH), device="cuda") for _ in range(3)]
    _loss_and_grads(model, lambda: graphed(batches[0], batches[0]))  # captures (no eager graph alive yet)

    def accumulated(loss_of):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            for ids in batches[1:]:
                loss_of(ids).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return grads

    replayed = accumulated(lambda ids: graphed(ids, ids))
    eager = accumulated(lambda ids: _loss(None)(model, ids, ids, None))
    for (name, _), a, b in zip(model.named_parameters(), eager, replayed):
        assert ((b - a).norm() / a.norm().clamp(min=1e-12)) < 2e-2, name
