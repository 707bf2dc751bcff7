"""What the GPU benchmark scripts share: medians of CUDA-event timings, the extra memory of a call, copy rate.

Imported by the scripts beside it (``python scripts/bench_*.py`` puts this folder on the path).
"""

import torch
import triton


def timed(fn, budget_ms: float = 300) -> float:
    """Median milliseconds of ``fn`` (CUDA events through triton's do_bench), after warm-up."""
    return triton.testing.do_bench(fn, warmup=max(25, budget_ms / 4), rep=budget_ms, return_mode="median")


def peak_extra_gib(fn) -> float:
    """GiB that one call of ``fn`` allocates on the GPU beyond what was allocated before it, at its peak."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def copy_bandwidth(device) -> float:
    """GB/s of a device-to-device copy of 1 GiB, bytes read and written counted."""
    src = torch.empty(2**29, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * 2**30 / timed(lambda: dst.copy_(src)) / 1e6
