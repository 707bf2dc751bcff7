"""One sequence split over two CPU processes (gloo) gives the loss and gradients of one pass over the whole."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mambatrain.config.schema import AttentionConfig, MambaConfig, ModelConfig
from mambatrain.distributed.context_parallel import (ContextParallel, all_reduce_gradients, context_parallel_forward,
                                                     context_parallel_loss)
from mambatrain.models.lm import LanguageModel

WORLD, LENGTH, VOCAB = 2, 64, 50


def tiny_model(kind: str, version: int, pattern: str | None) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(kind=kind, pattern=pattern, d_model=32, n_layers=2, vocab_size=VOCAB, d_mlp=32,
                         mamba=MambaConfig(version=version, d_state=8, head_dim=8, chunk_size=64, backend="reference"),
                         attention=AttentionConfig(n_heads=4, n_kv_heads=2))
    return LanguageModel(config).double()


def batch(documents: bool):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, LENGTH + 1), generator=generator)
    input_ids, labels = tokens[:, :-1], tokens[:, 1:].clone()  # labels shifted over the whole sequence
    labels[1, 5] = -100  # an ignored position
    seq_idx = None
    if documents:
        seq_idx = torch.zeros(2, LENGTH, dtype=torch.int32)
        seq_idx[:, 20:] = 1
        seq_idx[0, 31:] = 2  # two tokens before the rank edge (32): inside the carried conv tail
        seq_idx[1, 32:] = 2  # a new document exactly at the rank edge
        seq_idx[0, 40:] = 3
    return input_ids, labels, seq_idx


def worker(rank: int, init_file: str, kind: str, version: int, pattern: str | None, documents: bool):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = tiny_model(kind, version, pattern)
        input_ids, labels, seq_idx = batch(documents)
        whole = model.loss(model(input_ids, seq_idx), labels)
        whole.backward()
        expected = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()

        cp = ContextParallel()
        shard = cp.shard
        hidden = context_parallel_forward(model, shard(input_ids), cp, None if seq_idx is None else shard(seq_idx))
        loss = context_parallel_loss(model, hidden, shard(labels), cp)
        loss.backward()
        all_reduce_gradients(model, cp)

        torch.testing.assert_close(loss, whole, rtol=1e-5, atol=1e-7)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind, version, pattern, documents", [
    ("mamba", 2, None, False),
    ("mamba", 1, None, False),
    ("mamba", 2, None, True),
    ("mamba", 1, None, True),
    ("transformer", 2, None, True),
    ("hybrid", 2, "MA", False),
    ("hybrid", 1, "AM", True),
])
def test_context_parallel_equals_one_pass_over_the_whole_sequence(tmp_path, kind, version, pattern, documents):
    mp.spawn(worker, args=(str(tmp_path / "init"), kind, version, pattern, documents), nprocs=WORLD)
