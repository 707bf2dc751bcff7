"""RMSNorm and Mamba-2's gated RMSNorm in plain PyTorch: the specification.

    rms_norm:        out = x * rsqrt(mean(x^2) + eps) * weight
    gated_rms_norm:  g = y * silu(z);  out = g * rsqrt(mean_group(g^2) + eps) * weight

The mean runs over the last dim (plain) or over each group of ``group_size``
consecutive channels (gated; Mamba-2 normalises each group of heads on its
own). Computed in float32, float64 for float64 inputs (see
``mambatrain.models.blocks.precision``); the result has the input's dtype.
"""

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def gated_rms_norm_naive(
    y: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
) -> torch.Tensor:
    """y, z (..., dim), weight (dim,) -> (..., dim) in y's dtype; without z, a plain (grouped) RMSNorm."""
    gated = y.to(_compute_dtype(y))
    if z is not None:
        gated = gated * F.silu(z.to(_compute_dtype(z)))
    grouped = gated.unflatten(-1, (-1, group_size or y.shape[-1]))  # (..., groups, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return (grouped.flatten(-2) * weight.to(_compute_dtype(weight))).to(y.dtype)


def rms_norm_naive(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (..., dim), weight (dim,) -> (..., dim) in x's dtype."""
    return gated_rms_norm_naive(x, None, weight, eps)
