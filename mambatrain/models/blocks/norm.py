"""RMSNorm, and the gated RMSNorm that closes a Mamba-2 mixer.

Each runs on the fused Triton kernels of ``mambatrain_kernels.rmsnorm`` for CUDA tensors of fp32, bf16 or
fp16 (``backend="auto"``) and on the PyTorch code below otherwise (CPU, float64); ``"triton"`` and
``"reference"`` force one. The choice is logged once per norm kind (``mambatrain.models.backend``).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import KERNEL_DTYPES, use_triton
from .precision import upcast


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.eps = eps
        self.backend = backend  # auto | triton | reference (see the module docstring)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.backend, x, "rms_norm", "RMSNorm.backend", KERNEL_DTYPES):
            from mambatrain_kernels.rmsnorm.triton import rms_norm
            return rms_norm(x, self.weight, self.eps)
        # Normalise in float32: bf16 sums of squares lose the small channels.
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * upcast(self.weight)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """norm(y * silu(z)) over groups of channels, as in Mamba-2 (gate before the norm)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None, backend: str = "auto"):
        super().__init__(dim, eps, backend)
        self.group_size = group_size or dim

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if use_triton(self.backend, y, "gated rms_norm", "GatedRMSNorm.backend", KERNEL_DTYPES):
            from mambatrain_kernels.rmsnorm.triton import gated_rms_norm
            return gated_rms_norm(y, z, self.weight, self.eps, self.group_size)
        gated = upcast(y) * F.silu(upcast(z))
        grouped = gated.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (grouped.flatten(-2) * upcast(self.weight)).to(y.dtype)
