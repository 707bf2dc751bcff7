"""Each model kind memorises one small fixed batch: the whole stack learns end to end."""

import pytest
import torch

from mambatrain.config.schema import AttentionConfig, MambaConfig, ModelConfig
from mambatrain.models.lm import LanguageModel

THRESHOLD = 0.05  # mean cross-entropy (nats) after training; random guessing is ln(32) = 3.47

CASES = {
    "mamba2": dict(kind="mamba"),
    "mamba1": dict(kind="mamba", mamba=MambaConfig(version=1, d_state=8)),  # the time loop: the slowest CPU path
    "transformer": dict(kind="transformer", d_mlp=64),
    "hybrid": dict(kind="hybrid", pattern="MAM", d_mlp=64),
}


@pytest.mark.parametrize("name", CASES)
def test_tiny_model_overfits_one_batch(name):
    torch.manual_seed(0)
    options = dict(d_model=32, n_layers=3, vocab_size=32, mamba=MambaConfig(d_state=8, head_dim=8, chunk_size=64),
                   attention=AttentionConfig(n_heads=4))
    options.update(CASES[name])
    model = LanguageModel(ModelConfig(**options))
    tokens = torch.randint(0, 32, (2, 25))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        loss = model.loss(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < THRESHOLD, f"{name} reached only {loss.item():.3f}"
