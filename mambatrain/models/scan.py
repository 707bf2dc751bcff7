"""Choose the implementation of the Mamba ops (the scans, the conv + SiLU) once per call site: Triton or PyTorch.

``backend="auto"`` takes the Triton kernels for CUDA tensors and the PyTorch
reference otherwise; ``"triton"`` and ``"reference"`` force one. Forcing Triton
on a CPU tensor is an error unless ``TRITON_INTERPRET=1`` (the kernel tests'
mode): we never fall back silently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambatrain_kernels.selective_scan import selective_scan_naive
from mambatrain_kernels.ssd import ssd_chunked_torch

from .backend import KERNEL_DTYPES, use_triton


def _use_triton(backend: str, x: torch.Tensor, op: str) -> bool:
    return use_triton(backend, x, op, "model.mamba.backend", KERNEL_DTYPES)


def selective_scan(backend: str, *args, **kwargs):
    """Mamba-1 scan; arguments as ``mambatrain_kernels.selective_scan.selective_scan_naive``."""
    if _use_triton(backend, args[0], "selective scan"):
        from mambatrain_kernels.selective_scan.triton import selective_scan as fast
        return fast(*args, **kwargs)
    return selective_scan_naive(*args, **kwargs)


def ssd_scan(backend: str, *args, chunk_size: int = 256, **kwargs):
    """Mamba-2 scan; arguments as ``mambatrain_kernels.ssd.ssd_naive`` plus the chunk size.

    The reference path is the chunked PyTorch algorithm (matrix products, fast on CPUs), which the
    kernel tests hold equal to the time loop.
    """
    if _use_triton(backend, args[0], "ssd scan"):
        from mambatrain_kernels.ssd.triton import ssd_scan as fast
        return fast(*args, chunk_size=chunk_size, **kwargs)
    return ssd_chunked_torch(*args, chunk_size=chunk_size, **kwargs)


def conv1d_silu(backend: str, x: torch.Tensor, conv: nn.Conv1d, seq_idx: torch.Tensor | None,
                prefix: torch.Tensor | None) -> torch.Tensor:
    """silu(causal_conv1d(x, conv, seq_idx, prefix)): the fused Triton kernel, or the PyTorch path below."""
    if _use_triton(backend, x, "conv1d + silu"):
        from mambatrain_kernels.conv1d.triton import causal_conv1d_silu
        return causal_conv1d_silu(x, conv.weight[:, 0, :], conv.bias, seq_idx, prefix)
    return F.silu(causal_conv1d(x, conv, seq_idx, prefix))


def causal_conv1d(x: torch.Tensor, conv: nn.Conv1d, seq_idx: torch.Tensor | None,
                  prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal convolution over time of x (B, T, C); taps never cross a document boundary.

    ``prefix`` (B, width - 1, C) holds the inputs before x (carried state); without it they are zeros.
    ``seq_idx`` then covers prefix and x together, (B, width - 1 + T).
    """
    width, T = conv.kernel_size[0], x.shape[1]
    padded = F.pad(x, (0, 0, width - 1, 0)) if prefix is None else torch.cat([prefix.to(x.dtype), x], dim=1)
    if seq_idx is None:
        y = F.conv1d(padded.transpose(1, 2), conv.weight, conv.bias, groups=conv.groups)
        return y.transpose(1, 2)
    if prefix is None:
        seq_idx = F.pad(seq_idx, (width - 1, 0), value=-1)
    # Sum of shifted copies, each masked where the tap reaches into another document.
    weight = conv.weight[:, 0, :].to(x.dtype)  # (C, width); tap width-1 multiplies x[t]
    current = seq_idx[:, width - 1:]
    y = x * weight[:, width - 1]
    for shift in range(1, width):
        shifted = padded[:, width - 1 - shift: width - 1 - shift + T]
        same_doc = seq_idx[:, width - 1 - shift: width - 1 - shift + T] == current
        y = y + shifted * same_doc[..., None].to(x.dtype) * weight[:, width - 1 - shift]
    if conv.bias is not None:
        y = y + conv.bias.to(x.dtype)
    return y
