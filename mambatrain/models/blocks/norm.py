"""RMSNorm, and the gated RMSNorm that closes a Mamba-2 mixer."""

import torch
import torch.nn.functional as F
from torch import nn

from .precision import upcast


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: bf16 sums of squares lose the small channels.
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * upcast(self.weight)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """norm(y * silu(z)) over groups of channels, as in Mamba-2 (gate before the norm)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__(dim, eps)
        self.group_size = group_size or dim

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = upcast(y) * F.silu(upcast(z))
        grouped = gated.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (grouped.flatten(-2) * upcast(self.weight)).to(y.dtype)
