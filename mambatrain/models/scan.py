"""Choose the scan implementation once per call site: Triton kernels or the PyTorch reference.

``backend="auto"`` takes the Triton kernels for CUDA tensors and the PyTorch
reference otherwise; ``"triton"`` and ``"reference"`` force one. Forcing Triton
on a CPU tensor is an error unless ``TRITON_INTERPRET=1`` (the kernel tests'
mode): we never fall back silently.
"""

from __future__ import annotations

import torch

from mambatrain_kernels.selective_scan import selective_scan_naive
from mambatrain_kernels.ssd import ssd_chunked_torch

from .backend import use_triton


def _use_triton(backend: str, x: torch.Tensor, op: str) -> bool:
    return use_triton(backend, x, f"{op} scan", "model.mamba.backend")


def selective_scan(backend: str, *args, **kwargs):
    """Mamba-1 scan; arguments as ``mambatrain_kernels.selective_scan.selective_scan_naive``."""
    if _use_triton(backend, args[0], "selective"):
        from mambatrain_kernels.selective_scan.triton import selective_scan as fast
        return fast(*args, **kwargs)
    return selective_scan_naive(*args, **kwargs)


def ssd_scan(backend: str, *args, chunk_size: int = 256, **kwargs):
    """Mamba-2 scan; arguments as ``mambatrain_kernels.ssd.ssd_naive`` plus the chunk size.

    The reference path is the chunked PyTorch algorithm (matrix products, fast on CPUs), which the
    kernel tests hold equal to the time loop.
    """
    if _use_triton(backend, args[0], "ssd"):
        from mambatrain_kernels.ssd.triton import ssd_scan as fast
        return fast(*args, chunk_size=chunk_size, **kwargs)
    return ssd_chunked_torch(*args, chunk_size=chunk_size, **kwargs)
