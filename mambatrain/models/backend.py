"""Choose between a Triton kernel and its PyTorch reference, and say once in the log which one runs.

``backend="auto"`` takes the kernel for CUDA tensors (of the dtypes it takes, when the op names them)
and the reference otherwise; ``"triton"`` and ``"reference"`` force one. Forcing Triton where the
kernel cannot run (a CPU tensor without ``TRITON_INTERPRET=1``, the kernel tests' mode, or a dtype
it does not take) is an error: we never fall back silently.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)
_announced: set[tuple[str, str]] = set()

# What every kernel takes; float64 (exactness tests, float64 models) stays on the PyTorch code.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(backend: str, x: torch.Tensor, op: str, setting: str,
               dtypes: tuple[torch.dtype, ...] | None = None) -> bool:
    """True to run ``op`` (named in the log) on its Triton kernel for input ``x``.

    ``setting`` names the recipe key (or argument) that forces the choice, for the error messages;
    ``dtypes``, when given, are those the kernel takes: others go to the reference under auto.
    """
    if backend == "reference":
        choice = False
    elif backend == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{setting} is 'triton' but the {op} input is on {x.device}; "
                               "use backend: auto or reference on CPU (or TRITON_INTERPRET=1 to test kernels)")
        if dtypes is not None and x.dtype not in dtypes:
            raise TypeError(f"{setting} is 'triton' but the {op} input is {x.dtype}; the kernel takes "
                            f"{', '.join(str(d) for d in dtypes)} (auto runs the reference for others)")
        choice = True
    elif backend == "auto":
        choice = x.is_cuda and (dtypes is None or x.dtype in dtypes)
    else:
        raise ValueError(f"{setting} must be auto, triton or reference, got {backend!r}")
    key = (op, "triton" if choice else "reference")
    # torch.compile cannot trace a log call (fullgraph would fail): compiled code announces nothing
    if not torch.compiler.is_compiling() and key not in _announced:
        _announced.add(key)
        log.info("%s: %s implementation", op, key[1])
    return choice
