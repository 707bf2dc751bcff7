"""Context parallelism in the training loop (``trainer.context_parallel``): groups, batch slices, loss and its scale.

The world of W ranks is cut into W / N groups of N consecutive ranks (ranks 0..N-1, N..2N-1, ...). Each group is
one data-parallel replica: its ranks read the same batch (the data side shards by data-parallel rank,
``global_rank // N``) and each keeps its slice of the length (``ContextParallel.shard``).

Gradients: ``context_parallel_loss`` gives every rank the gradient of its own tokens' share of the group's mean
loss, so the group's full-sequence gradient is the *sum* over its N ranks. Lightning's DDP *averages* over all W
ranks, which divides by N too many: the loss handed to backward is scaled by N (``backward_scale``), and DDP's
average over W is then the average over the W / N replicas of each replica's full gradient. The logged loss is
the unscaled one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .context_parallel import ContextParallel, context_parallel_forward, context_parallel_loss

SEQUENCE_KEYS = ("input_ids", "labels", "seq_idx")  # (B, T) batch entries that are split along T


def build_context_parallel(size: int) -> ContextParallel | None:
    """This rank's group of ``size`` consecutive ranks; None when ``size`` is 1.

    A collective: every rank creates every group, in the same order (``new_group``'s rule).
    """
    if size == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return ContextParallel(mine)


def shard_batch(batch: dict, cp: ContextParallel) -> dict:
    """This rank's slice along the length of every sequence entry; other entries as they are."""
    return {key: cp.shard(value) if key in SEQUENCE_KEYS and value is not None else value
            for key, value in batch.items()}


def loss_and_hidden(model, batch: dict, cp: ContextParallel, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's mean loss over the whole sequence (same value on every rank) and this slice's hidden states.

    ``batch`` is already this rank's slice (``shard_batch``).
    """
    hidden = context_parallel_forward(model, batch["input_ids"], cp, batch.get("seq_idx"))
    return context_parallel_loss(model, hidden, batch["labels"], cp, chunk_size), hidden


def backward_scale(cp: ContextParallel | None) -> int:
    """Factor on the loss handed to DDP's backward so that its average over all ranks sums over the group."""
    return 1 if cp is None else cp.size


def group_sum(values: torch.Tensor, cp: ContextParallel | None) -> torch.Tensor:
    """``values`` summed over the group (counts such as correct predictions and labelled tokens)."""
    if cp is not None:
        values = values.clone()
        dist.all_reduce(values, group=cp.group)
    return values
