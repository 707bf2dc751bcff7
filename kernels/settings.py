"""What every op's Triton kernels share: interpreter mode, the autotune space, the debug fill.

``TRITON_INTERPRET=1`` runs the kernels in Triton's interpreter (the CPU tests); there one config per kernel,
since tuning would take minutes. ``MAMBATRAIN_AUTOTUNE=0`` takes one config per kernel on a GPU too (tests
would otherwise compile every config for each new shape). ``MAMBATRAIN_KERNEL_DEBUG=1`` fills what the
launchers allocate for the kernels with NaN, so that a kernel that leaves part of an output unwritten fails
the tests instead of passing on whatever the allocator handed back.
"""

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("MAMBATRAIN_AUTOTUNE", "1") == "1"
DEBUG_NAN = os.environ.get("MAMBATRAIN_KERNEL_DEBUG", "0") == "1"


def configs(space: list[dict], default: dict, gpu_default: dict) -> list[triton.Config]:
    """The autotune space on a GPU, ``gpu_default`` alone without autotuning, ``default`` in the interpreter.

    Each entry holds kernel meta-parameters plus num_warps / num_stages and, optionally, maxnreg (a register cap
    per thread: ptxas spills above it, and in exchange more programs fit on an SM).
    """
    def make(d):
        d = dict(d)
        return triton.Config(d, num_warps=d.pop("num_warps", 4), num_stages=d.pop("num_stages", 1),
                             maxnreg=d.pop("maxnreg", None))
    if INTERPRET:
        return [make(default)]
    return [make(d) for d in space] if AUTOTUNE else [make(gpu_default)]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launchers: ``triton.cdiv`` is a constexpr function, ~2 µs a host call through Triton's JIT
    wrapper; with these two, one SSD forward+backward issues ~0.05 ms faster (``benchmarks/bench_host_cpu.json``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for launchers (see ``cdiv``)."""
    return 1 << (n - 1).bit_length()


def new_buffer(*shape, device, dtype=torch.float32) -> torch.Tensor:
    """``torch.empty`` for a buffer a kernel fills; NaN-filled under ``MAMBATRAIN_KERNEL_DEBUG=1`` (read at each
    call, so tests may set ``DEBUG_NAN`` on this module)."""
    t = torch.empty(*shape, device=device, dtype=dtype)
    return t.fill_(float("nan")) if DEBUG_NAN else t
