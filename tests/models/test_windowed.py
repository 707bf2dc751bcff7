"""Loss and every gradient of the windowed path equal one pass over the whole sequence (float64, exact)."""

import pytest
import torch

from mambatrain.config.schema import AttentionConfig, MambaConfig, ModelConfig
from mambatrain.models.lm import LanguageModel
from mambatrain.models.loss import IGNORE_INDEX
from mambatrain.models.windowed import windowed_loss

LENGTH, VOCAB = 150, 40
MODELS = {
    "mamba2": dict(kind="mamba", mamba=MambaConfig(version=2, d_state=8, head_dim=8, chunk_size=64)),
    "mamba1": dict(kind="mamba", mamba=MambaConfig(version=1, d_state=4)),
    "transformer": dict(kind="transformer", attention=AttentionConfig(n_heads=4, n_kv_heads=2)),
    "sliding": dict(kind="transformer", attention=AttentionConfig(n_heads=4, sliding_window=37)),
    "hybrid": dict(kind="hybrid", pattern="MAMA", mamba=MambaConfig(d_state=8, head_dim=8, chunk_size=64),
                   attention=AttentionConfig(n_heads=4, sliding_window=None)),
}


def _model(name: str) -> LanguageModel:
    torch.manual_seed(0)
    spec = dict(MODELS[name])
    config = ModelConfig(d_model=32, n_layers=4 if name == "hybrid" else 2, vocab_size=VOCAB, d_mlp=48, **spec)
    return LanguageModel(config).double()


def _documents() -> torch.Tensor:
    seq_idx = torch.zeros(2, LENGTH, dtype=torch.int32)
    seq_idx[:, 50:] = 1  # exactly at a window edge (window 50)
    seq_idx[0, 71:] = 2  # inside a window
    seq_idx[1, 98:] = 2  # two tokens before an edge: inside the carried conv tail
    seq_idx[0, 149:] = 3  # a one-token document at the very end
    return seq_idx


def _assert_same(a, b, name=""):
    # Relative to the tensor's largest entry: entries near zero come from cancelling sums, whose last digits
    # depend on the order of the additions (whole sequence vs windows).
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item(), msg=lambda m: f"{name}: {m}")


def _loss_and_grads(model, loss):
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


def _assert_windowed_equals_whole(model, whole_loss, windowed_loss_):
    """Loss and every parameter gradient of the two (callables building each loss) agree."""
    whole, whole_grads = _loss_and_grads(model, whole_loss())
    windowed, grads = _loss_and_grads(model, windowed_loss_())
    torch.testing.assert_close(windowed, whole, rtol=1e-9, atol=1e-12)
    for (param, _), a, b in zip(model.named_parameters(), grads, whole_grads):
        _assert_same(a, b, param)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("window", [50, 64])  # 64 leaves a short last window (150 = 2 x 64 + 22)
def test_windowed_loss_and_gradients_equal_one_pass(name, documents, window):
    model = _model(name)
    tokens = torch.randint(0, VOCAB, (2, LENGTH))
    labels = torch.randint(0, VOCAB, (2, LENGTH))
    labels[0, :7] = IGNORE_INDEX
    labels[1, 100:130] = IGNORE_INDEX
    seq_idx = _documents() if documents else None
    _assert_windowed_equals_whole(model, lambda: model.loss(model(tokens, seq_idx), labels, chunk_size=32),
                                  lambda: windowed_loss(model, tokens, labels, seq_idx, window, 32))


def test_block_checkpointing_inside_windows_keeps_gradients():
    model = _model("hybrid")
    tokens = torch.randint(0, VOCAB, (2, LENGTH))

    def windowed_with_block_checkpoints():
        model.checkpoint_kinds = {"M", "A"}
        return windowed_loss(model, tokens, tokens, _documents(), 50, 8192)
    _assert_windowed_equals_whole(model, lambda: model.loss(model(tokens, _documents()), tokens),
                                  windowed_with_block_checkpoints)


def test_windowed_loss_without_gradients_equals_one_pass():
    model = _model("hybrid")
    tokens = torch.randint(0, VOCAB, (2, LENGTH))
    with torch.no_grad():
        whole = model.loss(model(tokens), tokens)
        windowed = windowed_loss(model, tokens, tokens, None, 64)
    torch.testing.assert_close(windowed, whole, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["mamba2", "hybrid"])
def test_windowed_evaluation_counts_the_same_correct_predictions(name):
    from mambatrain.models.windowed import windowed_evaluation

    model = _model(name)
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    labels = ids.roll(-1, 1)
    labels[:, ::3] = IGNORE_INDEX
    with torch.no_grad():
        hidden = model(ids, _documents())
        loss = model.loss(hidden, labels)
        targets = labels != IGNORE_INDEX
        correct = (model.logits(hidden[targets]).argmax(-1) == labels[targets]).sum()
    windowed, windowed_correct = windowed_evaluation(model, ids, labels, _documents(), 50, loss_chunk_size=16)
    _assert_same(windowed, loss)
    assert windowed_correct == correct
