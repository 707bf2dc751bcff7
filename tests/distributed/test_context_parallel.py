"""One sequence split over CPU processes (gloo) gives the loss and gradients of one pass over the whole."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mambatrain.config.schema import AttentionConfig, MambaConfig, ModelConfig
from mambatrain.distributed.context_parallel import (ContextParallel, all_reduce_gradients, context_parallel_forward,
                                                     context_parallel_loss)
from mambatrain.models.lm import LanguageModel

LENGTH, VOCAB = 64, 50


def tiny_model(kind: str, version: int, pattern: str | None, window: int | None = None) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(kind=kind, pattern=pattern, d_model=32, n_layers=2, vocab_size=VOCAB, d_mlp=32,
                         mamba=MambaConfig(version=version, d_state=8, head_dim=8, chunk_size=64, backend="reference"),
                         attention=AttentionConfig(n_heads=4, n_kv_heads=2, sliding_window=window))
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


def worker(rank: int, world: int, init_file: str, kind: str, version: int, pattern: str | None, documents: bool,
           window: int | None = None):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model(kind, version, pattern, window)
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
        with torch.no_grad():  # evaluation: the same exchanges without autograd
            evaluated = context_parallel_forward(model, shard(input_ids), cp, None if seq_idx is None else shard(seq_idx))
        torch.testing.assert_close(evaluated, hidden.detach())
        dist.barrier()  # no rank tears the group down while another still talks to it

        torch.testing.assert_close(loss, whole, rtol=1e-5, atol=1e-7)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind, version, pattern, documents, window", [
    ("mamba", 2, None, False, None),
    ("mamba", 1, None, False, None),
    ("mamba", 2, None, True, None),
    ("mamba", 1, None, True, None),
    ("transformer", 2, None, False, None),
    ("transformer", 2, None, True, 24),  # a sliding window reaching back over the rank edge
    ("hybrid", 2, "MA", False, None),
    ("hybrid", 1, "AM", True, None),
])
def test_context_parallel_equals_one_pass_over_the_whole_sequence(tmp_path, kind, version, pattern, documents, window):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), kind, version, pattern, documents, window), nprocs=2)


def test_middle_ranks_receive_and_send_state(tmp_path):
    """Four ranks of 16 tokens: ranks 1 and 2 both continue a state and hand one on (documents cross edges)."""
    mp.spawn(worker, args=(4, str(tmp_path / "init"), "hybrid", 2, "MA", True), nprocs=4)
