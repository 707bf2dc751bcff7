"""Benchmark the fused RMSNorm kernels against the PyTorch norms they replace, on a GPU.

    python scripts/bench_norm.py --out benchmarks/

For the norms of a 130M Mamba-2 (d_model 768, d_inner 1536, one group) at batch 1:
- the block norm (fp32 residual stream in, as under bf16 autocast), and the same on bf16 input;
- the gated norm of the mixer: y bf16, z a bf16 slice of the in-projection output (width 3352).
Times forward and forward+backward as called from Python (median of CUDA-event timings; at small sizes this
is the CPU's launch overhead), the kernels alone replayed from a CUDA graph with the bandwidth they reach
against the bytes each direction must move (inputs read once, outputs written once), and the memory kept
for the backward.
Checks each kernel against the PyTorch path first. Prints a table; writes JSON (GPU, commit, date).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton

from mambatrain.models.blocks.norm import GatedRMSNorm, RMSNorm

from gpu_timing import timed
from provenance import write_record
from mambatrain_kernels.rmsnorm.triton import rms_norm_bwd, rms_norm_fwd

LENGTHS = [16384, 65536, 262144]
D_MODEL, D_INNER, IN_PROJ = 768, 1536, 2 * 1536 + 2 * 128 + 24


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cases(T: int):
    """(name, module factory, input factory, bytes forward, bytes backward)."""
    def plain(dtype):
        size = torch.tensor([], dtype=dtype).element_size()
        return (f"rms_norm {D_MODEL} {str(dtype)[6:]}", lambda b: RMSNorm(D_MODEL, backend=b),
                lambda: (torch.randn(1, T, D_MODEL, device="cuda", dtype=dtype),),
                2 * size * T * D_MODEL, 3 * size * T * D_MODEL)

    def gated():
        def inputs():
            y = torch.randn(1, T, D_INNER, device="cuda", dtype=torch.bfloat16)
            z = torch.randn(1, T, IN_PROJ, device="cuda", dtype=torch.bfloat16)[..., :D_INNER]
            return y, z
        return (f"gated {D_INNER} bf16", lambda b: GatedRMSNorm(D_INNER, backend=b), inputs,
                3 * 2 * T * D_INNER, 5 * 2 * T * D_INNER)

    return [plain(torch.float32), plain(torch.bfloat16), gated()]


def bench(T: int) -> list[dict]:
    rows = []
    for name, make, inputs, fwd_bytes, bwd_bytes in cases(T):
        torch.manual_seed(0)
        args = [a.requires_grad_() for a in inputs()]
        grad = torch.randn(args[0].shape, device="cuda", dtype=args[0].dtype)
        row = dict(name=name, tokens=T)
        results = {}
        for kind in ("reference", "triton"):
            norm = make(kind).cuda()
            torch.manual_seed(1)
            with torch.no_grad():
                norm.weight.normal_(1.0, 0.1)

            def forward():
                return norm(*args)

            def both():
                for a in args:
                    a.grad = None
                norm.weight.grad = None
                forward().backward(grad)

            both()
            results[kind] = [forward()] + [a.grad for a in args] + [norm.weight.grad]
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            out = forward()
            saved = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
            del out
            fwd, fb = timed(forward), timed(both)
            row[kind] = dict(fwd_ms=fwd, fwd_bwd_ms=fb, saved_bytes_per_token=saved / T)
        # the kernels alone: no Python in the timed loop
        x, z = args[0].detach(), args[1].detach() if len(args) > 1 else None
        w, eps, group = norm.weight.detach(), norm.eps, getattr(norm, "group_size", D_MODEL)
        out, rstd = rms_norm_fwd(x, z, w, eps, group)
        gpu_fwd = triton.testing.do_bench_cudagraph(lambda: rms_norm_fwd(x, z, w, eps, group))
        gpu_bwd = triton.testing.do_bench_cudagraph(lambda: rms_norm_bwd(grad, x, z, w, rstd, eps, group))
        row["triton"].update(gpu_fwd_ms=gpu_fwd, gpu_bwd_ms=gpu_bwd,
                             fwd_GBps=fwd_bytes / gpu_fwd / 1e6, bwd_GBps=bwd_bytes / gpu_bwd / 1e6)
        row["max_rel_err_vs_reference"] = max(rel_err(a, b) for a, b in zip(results["triton"], results["reference"]))
        row["speedup_fwd_bwd"] = row["reference"]["fwd_bwd_ms"] / row["triton"]["fwd_bwd_ms"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_norm_<gpu>.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    args = parser.parse_args()
    rows = [r for T in args.lengths for r in bench(T)]
    print(f"{'norm':<22}{'tokens':>8}  {'ref fwd':>8} {'ref f+b':>8}  {'ours fwd':>8} {'ours f+b':>8}  "
          f"{'x':>5}  {'GPU fwd/bwd ms':>14} {'GB/s f/b':>11}  {'saved B/tok ref/ours':>20}  {'rel err':>8}")
    for r in rows:
        ref, ours = r["reference"], r["triton"]
        print(f"{r['name']:<22}{r['tokens']:>8}  {ref['fwd_ms']:>8.3f} {ref['fwd_bwd_ms']:>8.3f}  "
              f"{ours['fwd_ms']:>8.3f} {ours['fwd_bwd_ms']:>8.3f}  {r['speedup_fwd_bwd']:>5.1f}  "
              f"{ours['gpu_fwd_ms']:>6.3f}/{ours['gpu_bwd_ms']:<7.3f} {ours['fwd_GBps']:>5.0f}/{ours['bwd_GBps']:<5.0f}  "
              f"{ref['saved_bytes_per_token']:>9.0f}/{ours['saved_bytes_per_token']:<10.0f}  "
              f"{r['max_rel_err_vs_reference']:>8.1e}")
    if args.out is not None:
        path = write_record(args.out, "bench_norm", torch.cuda.get_device_name(), rows=rows)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
