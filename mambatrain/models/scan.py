"""Choose the scan implementation once per call site: Triton kernels or the PyTorch reference.

``backend="auto"`` takes the Triton kernels for CUDA tensors and the PyTorch
reference otherwise; ``"triton"`` and ``"reference"`` force one. Forcing Triton
on a CPU tensor is an error unless ``TRITON_INTERPRET=1`` (the kernel tests'
mode): we never fall back silently.
"""

from __future__ import annotations

import logging
import os

import torch

from mambatrain_kernels.selective_scan import selective_scan_naive
from mambatrain_kernels.ssd import ssd_chunked_torch

log = logging.getLogger(__name__)
_announced: set[tuple[str, str]] = set()


def _use_triton(backend: str, x: torch.Tensor, op: str) -> bool:
    if backend == "reference":
        choice = False
    elif backend == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"model.mamba.backend is 'triton' but the {op} input is on {x.device}; "
                               "use backend: auto or reference on CPU (or TRITON_INTERPRET=1 to test kernels)")
        choice = True
    else:
        choice = x.is_cuda
    key = (op, "triton" if choice else "reference")
    if key not in _announced:
        _announced.add(key)
        log.info("%s scan: %s implementation", op, key[1])
    return choice


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
