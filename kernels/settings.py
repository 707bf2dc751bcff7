"""What every op's Triton kernels share: interpreter mode, the autotune space, the debug fill.

``TRITON_INTERPRET=1`` runs the kernels in Triton's interpreter (the CPU tests); there one config per kernel,
since tuning would take minutes. ``MAMBATRAIN_AUTOTUNE=0`` takes one config per kernel on a GPU too (tests
would otherwise compile every config for each new shape). ``MAMBATRAIN_KERNEL_DEBUG=1`` fills what the
launchers allocate for the kernels with NaN, so that a kernel that leaves part of an output unwritten fails
the tests instead of passing on whatever the allocator handed back. The first call of an autotuned kernel for a
new shape compiles all its configs at once (see ``autotune``); ``MAMBATRAIN_PARALLEL_COMPILE=0`` compiles them
one by one as Triton does.
"""

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
from triton.runtime.autotuner import Autotuner

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("MAMBATRAIN_AUTOTUNE", "1") == "1"
DEBUG_NAN = os.environ.get("MAMBATRAIN_KERNEL_DEBUG", "0") == "1"
# On an H100 host: the first SSD call 70.2 -> 35.6 s, same outputs; every-config SSD tests pass with it
# (benchmarks/bench_compile_h100.json).
PARALLEL_COMPILE = os.environ.get("MAMBATRAIN_PARALLEL_COMPILE", "1") == "1"


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


class _ParallelCompileAutotuner(Autotuner):
    """Triton's autotuner, except that the configs of a new key are compiled concurrently before it times them.

    Triton compiles each config when the autotuner first launches it, one after another: every kernel's space
    at a new shape costs minutes on a fresh machine (the first training step, each new sequence length, the
    every-config tests). Compilation spends most of its time outside the GIL (MLIR and LLVM passes, ptxas in
    a subprocess): offline, six sm_90 compiles of the SSD backward took 4.6-5.2 s one after another and
    2.4-2.7 s on two threads of a 2-core machine (benchmarks/bench_compile_offline.json); on a 16-core H100
    host the first SSD forward + backward at chunk 64 took 35.6 s instead of 70.2 (bench_compile_h100.json). Triton's
    ``AsyncCompileMode`` runs the compiles of ``warmup`` calls on an executor and files the results in the
    kernel's cache, where the timing launches then find them.
    """

    def prune_configs(self, kwargs):
        # called once per new key, just before the configs are timed; self.nargs holds the positional arguments
        pruned = super().prune_configs(kwargs)
        if PARALLEL_COMPILE and not INTERPRET and len(pruned) > 1:
            _compile_concurrently(self.fn, list(self.nargs.values()), kwargs, pruned)
        return pruned


def _compile_concurrently(fn, args, kwargs, configs) -> None:
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # a Triton without it compiles config by config, as before
        return
    launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    workers = max(1, min(len(configs), 8, len(os.sched_getaffinity(0))))
    # A config that fails to compile is left to the timing launch, which raises or skips it as it would have
    # without this; a failure of the mechanism itself only costs the speed-up.
    try:
        with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for config in configs:
                fn.warmup(*args, grid=kwargs["grid"], **launch, **config.all_kwargs())
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"MAMBATRAIN_PARALLEL_COMPILE: compiling {fn} config by config instead ({error!r})")


def autotune(**kwargs):
    """``triton.autotune`` whose first call for a key compiles the key's configs concurrently unless
    ``MAMBATRAIN_PARALLEL_COMPILE=0`` (``_ParallelCompileAutotuner``)."""
    def decorate(fn):
        tuner = triton.autotune(**kwargs)(fn)
        if type(tuner) is Autotuner:
            # the subclass only overrides a method: swapping the class keeps Triton's constructor, whose
            # arguments differ between Triton versions
            tuner.__class__ = _ParallelCompileAutotuner
        return tuner
    return decorate
