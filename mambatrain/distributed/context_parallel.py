"""Context parallelism: one sequence split along its length over the ranks of a group.

Rank r of N holds tokens [r T/N, (r+1) T/N) of every sequence of the batch (T/N = L tokens each).

- Mamba blocks pass state along the ranks: rank r starts each Mamba layer from the conv tail (last d_conv - 1
  conv inputs) and final SSM state of rank r-1's segment, through the blocks' carried-state path (``MambaState``),
  and hands its own on to rank r+1. Backward hands the gradient w.r.t. that initial state from rank r back to
  rank r-1. Messages are O(state), not O(length). The pass is sequential per layer, but layers pipeline: rank r
  runs layer l while rank r+1 waits on it and rank r-1 runs layer l+1, so a stack of n Mamba layers takes about
  (n + N - 1) layer-times on L tokens. (The alternative, fully parallel scheme runs every segment from a zero
  state, all-gathers each segment's final state and total decay, combines them with the scan's associative
  operator into each rank's true initial state, and adds the initial state's contribution C_t (prod decay) h_0
  in a second pass; it needs the scan to return the cumulative decay, which ours does not yet.)
- Attention blocks all-gather keys and values over the group (backward: all-reduce of the key/value gradients,
  each rank keeping its own slice; gloo has no reduce-scatter), use keys up to the end of the rank's own segment,
  and mask causally by global position; RoPE rotates at global positions (offset r L). The attention block's
  decoding path does exactly this given such "cached" keys, so it is reused.
- Document boundaries (``seq_idx``, global ids) work across rank edges: the carried state keeps the last token's
  document id, and a segment that opens a new document starts from zero.

Model code stays single-device: ``context_parallel_forward`` walks the model's blocks from the outside and gives
each block a state object (its only hooks are the carried state of Mamba blocks and ``KVCache.keys_with``).
Activation checkpointing is refused on this path for now (recomputation would repeat the exchanges).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config.schema import MAMBA
from ..models.blocks.mamba import MambaState
from ..models.loss import IGNORE_INDEX


@dataclass
class ContextParallel:
    """The process group a sequence is split over; ``None`` means the default (world) group."""

    group: dist.ProcessGroup | None = None

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a (B, T, ...) tensor along T."""
        length = tensor.shape[1] // self.size
        return tensor[:, self.rank * length:(self.rank + 1) * length]


# --- state passing between neighbouring ranks (Mamba) ---------------------------------------------------------

class _ReceiveState(torch.autograd.Function):
    """Forward: receive tensors shaped like ``templates`` from rank r-1. Backward: send their gradients back."""

    @staticmethod
    def forward(ctx, cp: ContextParallel, anchor: torch.Tensor, *templates: torch.Tensor):
        ctx.cp = cp
        received = [torch.empty_like(t) for t in templates]
        for tensor in received:
            dist.recv(tensor, src=cp.global_rank(cp.rank - 1), group=cp.group)
        return tuple(received)

    @staticmethod
    def backward(ctx, *grads):
        for grad in grads:
            dist.send(grad.contiguous(), dst=ctx.cp.global_rank(ctx.cp.rank - 1), group=ctx.cp.group)
        return (None, None) + (None,) * len(grads)


class _SendState(torch.autograd.Function):
    """Forward: send tensors to rank r+1, returning a zero scalar token that the caller adds to its output, so
    that backward runs here, in layer order: it receives the tensors' gradients from rank r+1."""

    @staticmethod
    def forward(ctx, cp: ContextParallel, *tensors: torch.Tensor):
        ctx.cp = cp
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in tensors]
        for tensor in tensors:
            dist.send(tensor.contiguous(), dst=cp.global_rank(cp.rank + 1), group=cp.group)
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx, _):
        grads = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes]
        for grad in grads:
            dist.recv(grad, src=ctx.cp.global_rank(ctx.cp.rank + 1), group=ctx.cp.group)
        return (None,) + tuple(grads)


def _receive_mamba_state(cp: ContextParallel, mixer, batch: int, device, dtype) -> MambaState:
    """Conv tail in the model's dtype and float32 SSM state, as ``empty_state`` gives them (and the sender casts)."""
    state = mixer.empty_state(batch, device, dtype)
    if cp.rank == 0:
        return state  # the sequence starts from zero
    doc = torch.empty_like(state.doc)
    dist.recv(doc, src=cp.global_rank(cp.rank - 1), group=cp.group)
    anchor = torch.zeros((), device=device, requires_grad=torch.is_grad_enabled())
    state.conv, state.ssm = _ReceiveState.apply(cp, anchor, state.conv, state.ssm)
    state.doc = doc
    return state


def _send_mamba_state(cp: ContextParallel, state: MambaState, dtype) -> torch.Tensor | None:
    """Hand the segment's final state to rank r+1; returns the token to add to the block's output (or None)."""
    if cp.rank == cp.size - 1:
        return None
    dist.send(state.doc.contiguous(), dst=cp.global_rank(cp.rank + 1), group=cp.group)
    return _SendState.apply(cp, state.conv.to(dtype), state.ssm.float())


# --- keys and values from every rank (attention) -----------------------------------------------------------

class _AllGather(torch.autograd.Function):
    """Concatenate every rank's tensor along ``dim``; backward sums the gradients over ranks, keeps this rank's."""

    @staticmethod
    def forward(ctx, cp: ContextParallel, tensor: torch.Tensor, dim: int):
        ctx.cp, ctx.dim = cp, dim
        parts = [torch.empty_like(tensor) for _ in range(cp.size)]
        dist.all_gather(parts, tensor.contiguous(), group=cp.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.cp.group)
        return None, grad.chunk(ctx.cp.size, dim=ctx.dim)[ctx.cp.rank], None


def all_gather(cp: ContextParallel, tensor: torch.Tensor, dim: int) -> torch.Tensor:
    if not torch.is_grad_enabled() or not tensor.requires_grad:
        parts = [torch.empty_like(tensor) for _ in range(cp.size)]
        dist.all_gather(parts, tensor.contiguous(), group=cp.group)
        return torch.cat(parts, dim=dim)
    return _AllGather.apply(cp, tensor, dim)


class GatheredKeys:
    """Stands in for an attention block's ``KVCache``: the "cached" keys are those of the earlier ranks.

    ``position`` (r L) is the global position of this rank's first token, so RoPE and the causal mask see
    global positions. Keys of later ranks are dropped: every query of this rank would mask them out.
    """

    def __init__(self, cp: ContextParallel, batch: int, device):
        self.cp = cp
        self.doc = torch.zeros(batch, 0, dtype=torch.int64, device=device)  # no seq_idx: one document
        self.position = 0

    def keys_with(self, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor):
        end = (self.cp.rank + 1) * k.shape[2]
        keys = all_gather(self.cp, k, dim=2)[:, :, :end]  # (B, Hkv, (r+1) L, hd)
        values = all_gather(self.cp, v, dim=2)[:, :, :end]
        docs = all_gather(self.cp, doc.to(torch.int64), dim=1)[:, :end]  # (B, (r+1) L)
        return keys, values, docs


# --- entry points --------------------------------------------------------------------------------------------

def context_parallel_forward(model, input_ids: torch.Tensor, cp: ContextParallel,
                             seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``model(input_ids, seq_idx)`` for this rank's shard: input_ids (B, L) and seq_idx (B, L) (global document
    ids) are ``cp.shard`` of the whole sequence's. Returns this shard's final hidden states (B, L, d_model)."""
    if model.checkpoint_kinds and torch.is_grad_enabled():  # never silently train without it
        raise NotImplementedError("trainer.activation_checkpointing is not supported with context parallelism yet "
                                  "(recomputing a block would repeat its exchanges)")
    B, L = input_ids.shape
    x = model.embedding(input_ids)
    for block in model.blocks:
        if block.kind == MAMBA:
            state = _receive_mamba_state(cp, block.mixer, B, x.device, x.dtype)
            x = block(x, seq_idx, state)
            token = _send_mamba_state(cp, state, x.dtype)
            if token is not None:
                x = x + token.to(x.dtype)
        else:
            keys = GatheredKeys(cp, B, x.device)
            keys.position = cp.rank * L
            x = block(x, seq_idx, keys)
    return model.norm_f(x)


def context_parallel_loss(model, hidden: torch.Tensor, labels: torch.Tensor, cp: ContextParallel,
                          chunk_size: int = 8192) -> torch.Tensor:
    """The mean loss over the whole sequence's tokens (labels != -100), the same value on every rank.

    labels (B, L) are this rank's shard of the globally shifted labels. The gradient is this rank's share only
    (its tokens' loss sum over the global count): sum the parameter gradients over the group afterwards
    (``all_reduce_gradients``) to get the gradient of the global mean.
    """
    local_count = (labels != IGNORE_INDEX).sum()
    local = model.loss(hidden, labels, chunk_size) * local_count.clamp(min=1)  # this shard's loss sum (chunked)
    totals = torch.stack([local.detach(), local_count.to(local.dtype)])
    dist.all_reduce(totals, group=cp.group)
    total, count = totals[0], totals[1].clamp(min=1)
    return (local + (total - local.detach())) / count


def all_reduce_gradients(model, cp: ContextParallel) -> None:
    """Sum every parameter's gradient over the group (each rank holds its shard's share)."""
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=cp.group)
