"""Benchmark the fused causal conv1d + SiLU kernel on a GPU against the PyTorch path it replaces.

    python scripts/bench_conv1d.py --out benchmarks/      # a minute or two on an H100

What it does, in order:
1. Measures the GPU's device-to-device copy bandwidth (the floor of a memory-bound op).
2. Checks the kernel against the naive loop (float64) on the GPU: output and every gradient at an odd
   length, fp32 and bf16, with a prefix and document boundaries; and the bf16 forward at the longest length
   against the PyTorch path in fp32.
3. Times forward and forward+backward (bf16, batch 1, x a slice of the in-projection's output as in the
   130M Mamba-2: 1792 of 3352 channels, width 4) from 4k to 1M tokens: the PyTorch path
   ``silu(causal_conv1d(...))`` under bf16 autocast (cuDNN's conv1d without documents, shifted sums with
   them) and ours (its backward also as the row walk, conv1d.triton.WALK_BWD, for each --walk-programs), each
   without and with seq_idx. Reports ms (median, CUDA events), the GPU kernels' summed time of one forward +
   backward (torch.profiler: short rows wait on the CPU), GB/s against the bytes floor (forward: read x, write
   y; backward: read x and dout, write dx) and the peak extra memory.
4. Times a whole training step (forward, backward, AdamW) of the 130M Mamba-2 at --step-length tokens with
   the old and the new conv path, and sums its GPU kernels' times (torch.profiler).
5. Writes bench_conv1d.json (GPU, commit, date, versions) and prints tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch import nn

from mambatrain.config.schema import MambaConfig, ModelConfig
from mambatrain.models import scan
from mambatrain.models.lm import LanguageModel
from mambatrain_kernels.conv1d import causal_conv1d_silu, causal_conv1d_silu_naive
from mambatrain_kernels.conv1d import triton as conv1d_triton

from gpu_timing import copy_bandwidth, peak_extra_gib, timed
from provenance import commit

LENGTHS = [4096, 16384, 65536, 262144, 1048576]
CHANNELS, PROJ_WIDTH, WIDTH = 1792, 3352, 4  # 130M Mamba-2: xBC inside (z, xBC, dt)


def gpu_kernel_ms(fn) -> float:
    """Sum of the GPU kernels' times of one call (torch.profiler): GPU work, apart from CPU overhead."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float("nan") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def documents(length: int, device) -> torch.Tensor:
    """(1, length) ids: documents of 1000-5000 tokens."""
    g = torch.Generator().manual_seed(0)
    starts = torch.zeros(length, dtype=torch.int32)
    t = 0
    while t < length:
        starts[t] = 1
        t += int(torch.randint(1000, 5000, (1,), generator=g))
    return starts.cumsum(0).to(device)[None]


def check(device) -> dict:
    out = {}
    walk_default = conv1d_triton.WALK_BWD
    for walk, dtype in ((False, torch.float32), (False, torch.bfloat16), (True, torch.float32), (True, torch.bfloat16)):
        conv1d_triton.WALK_BWD = walk
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(2, 4099, 300, device=device, generator=g)[..., 7:207].to(dtype)
        inp = dict(x=x, weight=torch.randn(200, WIDTH, device=device, generator=g) / 2,
                   bias=torch.randn(200, device=device, generator=g),
                   prefix=torch.randn(2, WIDTH - 1, 200, device=device, generator=g).to(dtype))
        seq_idx = torch.cat([torch.zeros(2, WIDTH - 1, dtype=torch.int32, device=device),
                             documents(4099, device).expand(2, -1)], 1)
        gy = torch.randn(x.shape, device=device, generator=g).to(dtype)
        results = []
        for fn, cast in ((causal_conv1d_silu, lambda t: t), (causal_conv1d_silu_naive, lambda t: t.double())):
            leaves = {k: cast(v).detach().requires_grad_() for k, v in inp.items()}
            y = fn(leaves["x"], leaves["weight"], leaves["bias"], seq_idx, leaves["prefix"])
            grads = torch.autograd.grad(y, list(leaves.values()), cast(gy))
            results.append((y, dict(zip(leaves, grads))))
        (y, gr), (y0, g0) = results
        out[str(dtype)[6:] + ("_walk_backward" if walk else "")] = {"y": rel(y, y0),
                                                                     **{"d" + k: rel(gr[k], g0[k]) for k in g0}}
    conv1d_triton.WALK_BWD = walk_default
    return out


def check_long(length: int, device) -> float:
    proj = torch.randn(1, length, PROJ_WIDTH, device=device, dtype=torch.bfloat16)
    x = proj[..., 1536:1536 + CHANNELS]
    conv = nn.Conv1d(CHANNELS, CHANNELS, WIDTH, groups=CHANNELS).to(device)
    seq_idx = documents(length, device)
    with torch.no_grad():
        y = causal_conv1d_silu(x, conv.weight[:, 0], conv.bias, seq_idx)
        y0 = F.silu(scan.causal_conv1d(x.float(), conv, seq_idx))
    return rel(y, y0)


def time_conv(length: int, device, walk_programs: list[int]) -> list[dict]:
    proj = torch.randn(1, length, PROJ_WIDTH, device=device, dtype=torch.bfloat16)
    x = proj.detach()[..., 1536:1536 + CHANNELS].requires_grad_()
    conv = nn.Conv1d(CHANNELS, CHANNELS, WIDTH, groups=CHANNELS).to(device)
    gy = torch.randn(1, length, CHANNELS, device=device, dtype=torch.bfloat16)
    seq_idx = documents(length, device)
    elems = length * CHANNELS
    rows = []
    walk_default = conv1d_triton.WALK_BWD, conv1d_triton.WALK_PROGRAMS
    for docs in (False, True):
        s = seq_idx if docs else None
        ours = lambda: causal_conv1d_silu(x, conv.weight[:, 0], conv.bias, s)  # noqa: E731
        paths = {  # name: (function, WALK_BWD, WALK_PROGRAMS)
            "pytorch": (lambda: F.silu(scan.causal_conv1d(x, conv, s)), False, None),
            "triton": (ours, False, None),
            **{f"triton_walk_{n}": (ours, True, n) for n in walk_programs},
        }
        for name, (f, walk, programs) in paths.items():
            conv1d_triton.WALK_BWD = walk
            conv1d_triton.WALK_PROGRAMS = programs or conv1d_triton.WALK_PROGRAMS
            def fwd():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return f()

            def fwd_bwd():
                return torch.autograd.grad(fwd(), [x, conv.weight, conv.bias], gy)

            with torch.no_grad():
                fwd_ms = timed(fwd)
            total_ms = timed(fwd_bwd)
            rows.append({
                "length": length, "path": name, "documents": docs, "fwd_ms": fwd_ms, "fwd_bwd_ms": total_ms,
                "bwd_ms": total_ms - fwd_ms, "fwd_bwd_gpu_ms": gpu_kernel_ms(fwd_bwd),
                "fwd_GBps": 4 * elems / fwd_ms / 1e6, "fwd_bwd_GBps": 10 * elems / total_ms / 1e6,
                "peak_extra_GiB": peak_extra_gib(fwd_bwd),
            })
            print_row(rows[-1])
    conv1d_triton.WALK_BWD, conv1d_triton.WALK_PROGRAMS = walk_default
    return rows


def time_step(length: int, device) -> dict:
    config = ModelConfig(kind="mamba", d_model=768, n_layers=24, vocab_size=50280,
                         mamba=MambaConfig(version=2, expand=2, d_state=128, head_dim=64, chunk_size=256))
    torch.manual_seed(0)
    model = LanguageModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 50280, (1, length), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(model(ids), ids, 8192)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    fast = scan.conv1d_silu
    out = {"length": length}
    try:
        for name in ("pytorch", "triton"):
            scan.conv1d_silu = fast if name == "triton" else (lambda backend, *a: fast("reference", *a))
            step()
            out[f"{name}_step_ms"] = timed(step, budget_ms=2000)
            out[f"{name}_gpu_kernel_ms"] = gpu_kernel_ms(step)
            torch.cuda.reset_peak_memory_stats()
            step()
            out[f"{name}_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        scan.conv1d_silu = fast
    print(json.dumps(out))
    return out


COLUMNS = ["length", "path", "documents", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_bwd_gpu_ms", "fwd_GBps",
           "fwd_bwd_GBps", "peak_extra_GiB"]


def print_row(row: dict) -> None:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    print(" | ".join(f"{fmt(row[c]):>12}" for c in COLUMNS), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks"), help="folder for bench_conv1d.json")
    parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    parser.add_argument("--step-length", type=int, default=16384, help="0: no training step")
    parser.add_argument("--walk-programs", type=int, nargs="*", default=[conv1d_triton.WALK_PROGRAMS],
                        help="values of conv1d.triton.WALK_PROGRAMS to time the walk backward with")
    args = parser.parse_args()
    device = torch.device("cuda")
    report = {
        "gpu": torch.cuda.get_device_name(), "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__,
        "autotune": os.environ.get("MAMBATRAIN_AUTOTUNE", "1"),
        "shape": {"batch": 1, "channels": CHANNELS, "projection_width": PROJ_WIDTH, "width": WIDTH,
                  "dtype": "bfloat16"},
        "copy_GBps": copy_bandwidth(device),
    }
    report["check_vs_naive"] = check(device)
    report["check_long_bf16_vs_fp32"] = {"length": max(args.lengths), "rel_err": check_long(max(args.lengths), device)}
    print(json.dumps(report))
    print(" | ".join(f"{c:>12}" for c in COLUMNS))
    report["runs"] = [row for length in args.lengths for row in time_conv(length, device, args.walk_programs)]
    import mambatrain_kernels.conv1d.triton as ct
    report["chosen_configs"] = {kernel.fn.__name__: {str(key): str(cfg) for key, cfg in kernel.cache.items()}
                                for kernel in (ct.conv1d_silu_fwd_kernel, ct.conv1d_silu_bwd_kernel,
                                               ct.conv1d_silu_bwd_walk_kernel)}
    print(json.dumps(report["chosen_configs"], indent=1))
    if args.step_length:
        report["training_step"] = time_step(args.step_length, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_conv1d.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
