"""Output projection + cross-entropy in chunks of tokens, never building all logits.

At 1M tokens x 50k vocabulary the logits alone would take 100 GB in bf16. Two implementations, chosen as
the other kernels are (``backend``, see ``models.backend``):

- triton (auto on CUDA): ``mambatrain_kernels.cross_entropy.linear_cross_entropy``. Per chunk, the logits
  matmul, one kernel that turns them into the loss and, in place, their gradient, and the two gradient
  matmuls, all in the forward pass; the backward scales the saved gradients of hidden and weight.
- reference (auto on CPU, and for float64): each chunk's logits are computed, reduced to a loss and
  dropped; the backward pass recomputes them chunk by chunk (activation checkpointing), so memory holds one
  chunk of fp32 logits at a time.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from mambatrain_kernels.cross_entropy import IGNORE_INDEX, chunk_cross_entropy_sum

from .backend import KERNEL_DTYPES, use_triton

__all__ = ["IGNORE_INDEX", "chunked_cross_entropy", "chunked_cross_entropy_sum"]


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk_size: int = 8192, backend: str = "auto") -> torch.Tensor:
    """Summed (float32) next-token loss over labels != -100; arguments as ``chunked_cross_entropy``."""
    if use_triton(backend, hidden, "linear + cross-entropy", "chunked_cross_entropy backend", KERNEL_DTYPES):
        from mambatrain_kernels.cross_entropy.triton import linear_cross_entropy
        return linear_cross_entropy(hidden, weight, labels, chunk_size)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(chunk_cross_entropy_sum, h, weight, y, use_reentrant=False)
        else:
            total = total + chunk_cross_entropy_sum(h, weight, y)
    return total


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 8192, backend: str = "auto") -> torch.Tensor:
    """Mean next-token loss over labels != -100.

    hidden (..., d_model) final normalised states; weight (vocab, d_model) the head;
    labels (...) target ids aligned with hidden (already shifted). ``backend``: auto (the Triton kernel for
    CUDA tensors of fp32 / bf16 / fp16, the PyTorch path otherwise), triton or reference.
    """
    count = (labels != IGNORE_INDEX).sum()
    return chunked_cross_entropy_sum(hidden, weight, labels, chunk_size, backend) / count.clamp(min=1)
