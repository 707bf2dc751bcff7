"""What one SSD scan forward+backward costs the CPU that issues it, without a GPU.

    python scripts/bench_host.py                 # 16k tokens, 24 heads x 64, d_state 128, chunk 64

At short lengths the GPU waits on the host (benchmarks/profile_scan_16k_host_h100.json: ~1.1 ms of kernels at
16k tokens for 1.5-3 ms of host time on an H100's machine). This script measures the host side alone: it runs
ssd_fwd / ssd_bwd on CPU tensors with every Triton launch of the SSD kernels replaced by a call that does
nothing, so what remains is Python, the launchers' arithmetic, buffer allocation, torch ops (on CPU here) and the
autograd / custom-op machinery. Medians of interleaved repeats, in ms:

- ``public``: ``ssd_scan`` + ``torch.autograd.grad``, as a model calls it (custom op, its registered autograd);
- ``function``: the same with ``ssd.triton.EAGER_FUNCTION`` on, through a plain ``torch.autograd.Function``
  (what the custom op's dispatch costs on top of autograd);
- ``launchers``: ``ssd_fwd`` + ``ssd_bwd`` called directly (no autograd, no custom-op dispatch).

Triton's own launch path (argument binding, the autotuner's cache lookup) is not in these figures: it needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # the kernels' modules import without a GPU; no kernel runs

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import SSD_SHAPE  # noqa: E402

from mambatrain_kernels.ssd import triton as ssd_triton  # noqa: E402
from mambatrain_kernels.ssd import triton_bwd, triton_fwd  # noqa: E402


class _NoLaunch:
    """Stands in for a kernel: ``kernel[grid](...)`` returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _skip_launches() -> None:
    for module in (triton_fwd, triton_bwd, ssd_triton):
        for name in list(vars(module)):
            if name.startswith("ssd_") and name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    _skip_launches()
    s = SSD_SHAPE
    leaves = [torch.randn(1, args.length, s["heads"], s["head_dim"]), torch.randn(1, args.length, s["heads"]),
              -torch.rand(s["heads"]), torch.randn(1, args.length, s["groups"], s["d_state"]),
              torch.randn(1, args.length, s["groups"], s["d_state"]), torch.randn(s["heads"]),
              torch.randn(s["heads"])]
    x, dt, A, B, C, D, dt_bias = [t.requires_grad_() for t in leaves]
    dout = torch.randn_like(x)
    chunk = s["chunk"]

    def public():
        y = ssd_triton.ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, chunk_size=chunk)
        torch.autograd.grad(y, leaves, dout)

    def function():
        ssd_triton.EAGER_FUNCTION = True
        try:
            public()
        finally:
            ssd_triton.EAGER_FUNCTION = False

    def launchers():
        with torch.no_grad():
            out = ssd_triton.ssd_fwd(x, dt, A, B, C, D, None, dt_bias, True, None, None, chunk)
            ssd_triton.ssd_bwd(dout, None, x, dt, A, B, C, D, None, dt_bias, True, None, None, chunk, x, *out[3:])

    calls = {"public": public, "function": function, "launchers": launchers}
    times = {name: [] for name in calls}
    for _ in range(10):
        for call in calls.values():
            call()
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every call alike
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    result = {"length": args.length, "chunk": chunk, "torch": torch.__version__,
              **{f"{name}_ms": round(statistics.median(t), 3) for name, t in times.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
