"""Output projection + cross-entropy in chunks of tokens, never building all logits.

At 1M tokens x 50k vocabulary the logits alone would take 100 GB in bf16. Each
chunk's logits are computed, reduced to a loss and dropped; the backward pass
recomputes them chunk by chunk (activation checkpointing), so memory holds one
chunk of logits at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t().to(hidden.dtype)  # (chunk, vocab)
    # float32 at least (bf16 logits lose the loss's precision); float64 stays float64 for exactness tests
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk_size: int = 8192) -> torch.Tensor:
    """Summed (float32) next-token loss over labels != -100; arguments as ``chunked_cross_entropy``."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, h, weight, y, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, y)
    return total


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 8192) -> torch.Tensor:
    """Mean next-token loss over labels != -100.

    hidden (..., d_model) final normalised states; weight (vocab, d_model) the head;
    labels (...) target ids aligned with hidden (already shifted).
    """
    count = (labels != IGNORE_INDEX).sum()
    return chunked_cross_entropy_sum(hidden, weight, labels, chunk_size) / count.clamp(min=1)
