"""Windows of a stream with carried Mamba state give the outputs of one pass over the whole stream."""

import pytest
import torch

from mambatrain.config.schema import MambaConfig, ModelConfig
from mambatrain.models.lm import LanguageModel


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("with_documents", [False, True])
def test_windows_with_carried_state_equal_whole_sequence(version, with_documents):
    torch.manual_seed(version)
    config = ModelConfig(kind="mamba", d_model=32, n_layers=2, vocab_size=50, d_mlp=32,
                         mamba=MambaConfig(version=version, d_state=8, head_dim=8, chunk_size=64))
    model = LanguageModel(config).double()
    tokens = torch.randint(0, 50, (2, 90))
    seq_idx = None
    if with_documents:  # boundaries inside windows and exactly at a window edge (30)
        seq_idx = torch.zeros(2, 90, dtype=torch.int32)
        seq_idx[:, 30:] = 1
        seq_idx[0, 47:] = 2
        seq_idx[1, 58:] = 2  # two tokens before a window edge (60): inside the carried conv tail
        seq_idx[0, 89:] = 3  # a one-token document at the very end
    with torch.no_grad():
        whole = model(tokens, seq_idx)
        states = model.empty_states(2, tokens.device)
        parts = []
        for start in range(0, 90, 30):
            window = slice(start, start + 30)
            parts.append(model(tokens[:, window], None if seq_idx is None else seq_idx[:, window], states))
    # The carried SSM state is float32 by design, so equality holds to float32 rounding.
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_keeps_loss_and_gradients():
    torch.manual_seed(0)
    config = ModelConfig(kind="hybrid", pattern="MA", d_model=32, n_layers=2, vocab_size=20,
                         mamba=MambaConfig(d_state=8, head_dim=8))
    model = LanguageModel(config)
    tokens = torch.randint(0, 20, (2, 16))
    plain = model.loss(model(tokens), tokens)
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    model.checkpoint_kinds = {"M", "A"}
    recomputed = model.loss(model(tokens), tokens)
    grads = torch.autograd.grad(recomputed, list(model.parameters()))
    torch.testing.assert_close(recomputed, plain)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("d_conv", [1, 4])
@pytest.mark.parametrize("with_documents", [False, True])
def test_windows_of_any_length_carry_d_conv_minus_one_inputs(version, d_conv, with_documents):
    """Windows shorter than the conv tail (1 and 2 tokens), and d_conv 1 (no tail at all: ``x[:, -0:]`` is all of
    x, not none of it); rows whose documents begin at different window edges continue independently."""
    torch.manual_seed(version)
    config = ModelConfig(kind="mamba", d_model=16, n_layers=1, vocab_size=50,
                         mamba=MambaConfig(version=version, d_state=4, head_dim=8, d_conv=d_conv))
    model = LanguageModel(config).double()
    tokens = torch.randint(0, 50, (3, 14))
    seq_idx = None
    if with_documents:
        seq_idx = torch.zeros(3, 14, dtype=torch.int32)
        seq_idx[0, 3:] = 1  # at a window edge in this row only
        seq_idx[1, 4:] = 1  # the last token of a window opens a document
        seq_idx[2, 6:] = 1  # inside a window
    with torch.no_grad():
        whole = model(tokens, seq_idx)
        states = model.empty_states(3, tokens.device)
        parts, start = [], 0
        for end in (1, 3, 5, 6, 14):
            window = slice(start, end)
            parts.append(model(tokens[:, window], None if seq_idx is None else seq_idx[:, window], states))
            assert states[0].conv.shape[1] == d_conv - 1
            start = end
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-9, atol=1e-12)
