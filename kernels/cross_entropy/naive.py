"""Output projection + cross-entropy in plain PyTorch: the specification.

    logits = hidden @ weight^T                      (in hidden's dtype: bf16 under autocast)
    loss   = sum over rows with label != -100 of  logsumexp(logits_row) - logits_row[label]

computed one chunk of rows at a time, the logits of a chunk in float32 (float64 for float64 inputs).
The model's CPU path (``mambatrain.models.loss``) is this, under activation checkpointing.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def chunk_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed loss of one chunk: hidden (rows, d_model), weight (vocab, d_model), labels (rows,)."""
    logits = hidden @ weight.t().to(hidden.dtype)  # (rows, vocab)
    # float32 at least (bf16 logits lose the loss's precision); float64 stays float64 for exactness tests
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # any integer labels, as the Triton op takes (cross_entropy itself wants int64)
    return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")


def linear_cross_entropy_naive(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_size: int = 8192) -> torch.Tensor:
    """Summed loss (float32, float64 for float64 hidden) over labels != -100.

    hidden (..., d_model), weight (vocab, d_model), labels (...) aligned with hidden.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_size):
        total = total + chunk_cross_entropy_sum(hidden[start:start + chunk_size], weight,
                                                labels[start:start + chunk_size])
    return total
