"""Benchmark the fused linear + cross-entropy against the checkpointed PyTorch loss it replaces, on a GPU.

    python scripts/bench_cross_entropy.py                 # JSON to $OUT if set, else benchmarks/

The LM head of a 130M model: hidden (tokens, 768) bf16, the fp32 tied embedding (50280, 768) as the head,
chunks of 8192 tokens, random inputs (5% of labels -100). Checks the kernel path against the PyTorch path
first (loss, d hidden, d weight, at a length with a partial last chunk). Then, per length, times as called
from Python (median of CUDA-event timings): forward + backward of both paths, the no-grad loss (evaluation),
and the extra memory of forward + backward. The floor: the matmul FLOPs each path must do (4 per chunk for
the PyTorch path: logits, their recomputation, d hidden, d weight; 3 for the fused path), at the GPU's dense
bf16 peak and at the rate cuBLAS reaches on one chunk's logits matmul here. Prints a table; writes JSON
(GPU, commit, date).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from mambatrain.models.loss import chunked_cross_entropy_sum

from gpu_timing import peak_extra_gib, timed
from provenance import write_record

LENGTHS = [16384, 65536, 262144]
D_MODEL, VOCAB, CHUNK = 768, 50280, 8192
IGNORED = 0.05
# dense bf16 tensor-core peak, FLOP/s (SXM parts)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
MATMULS = {"reference": 4, "triton": 3}  # (chunk x vocab x d_model) matmuls per chunk


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def inputs(T: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(T, D_MODEL, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (0.02 * torch.randn(VOCAB, D_MODEL, device="cuda", generator=g)).requires_grad_()
    labels = torch.randint(0, VOCAB, (T,), device="cuda", generator=g)
    labels[torch.rand(T, device="cuda", generator=g) < IGNORED] = -100
    return hidden, weight, labels


def loss_and_grads(kind: str, hidden, weight, labels):
    hidden.grad = weight.grad = None
    loss = chunked_cross_entropy_sum(hidden, weight, labels, CHUNK, backend=kind)
    (loss / labels.numel()).backward()
    return loss.detach(), hidden.grad, weight.grad


def check(T: int = 2 * CHUNK + 1000) -> dict:
    """Relative errors of the fused path against the PyTorch path (a partial last chunk included)."""
    hidden, weight, labels = inputs(T, seed=1)
    ref, ours = (loss_and_grads(k, hidden, weight, labels) for k in ("reference", "triton"))
    errs = {name: rel_err(a, b) for name, a, b in zip(("loss", "dhidden", "dweight"), ours, ref)}
    with torch.no_grad():
        errs["loss_no_grad"] = rel_err(chunked_cross_entropy_sum(hidden, weight, labels, CHUNK, backend="triton"),
                                       ref[0])
    bad = {k: e for k, e in errs.items() if not e < 1e-2}
    if bad:
        raise SystemExit(f"the fused path disagrees with the PyTorch path at {T} tokens: {errs}")
    return errs


def flop_floor(T: int, kind: str) -> float:
    return MATMULS[kind] * 2 * T * VOCAB * D_MODEL


def matmul_rate() -> float:
    """FLOP/s cuBLAS reaches on one chunk's logits matmul (bf16, chunk x d_model @ d_model x vocab)."""
    h = torch.randn(CHUNK, D_MODEL, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(VOCAB, D_MODEL, device="cuda", dtype=torch.bfloat16)
    return 2 * CHUNK * VOCAB * D_MODEL / (timed(lambda: h @ w.t()) / 1e3)


def bench(T: int, peak: float | None, rate: float) -> dict:
    hidden, weight, labels = inputs(T)
    row = dict(tokens=T)
    for kind in ("reference", "triton"):
        def both():
            loss_and_grads(kind, hidden, weight, labels)

        def evaluate():
            with torch.no_grad():
                chunked_cross_entropy_sum(hidden, weight, labels, CHUNK, backend=kind)

        both()  # warm-up (autotuning, on the first fused call)
        hidden.grad = weight.grad = None
        memory = peak_extra_gib(both)
        flops = flop_floor(T, kind)
        # a second of timing per call: the PyTorch path takes most of a second at 256k tokens
        row[kind] = dict(fwd_bwd_ms=timed(both, 1000), no_grad_ms=timed(evaluate, 1000), peak_extra_gib=memory,
                         matmul_flops=flops, floor_at_cublas_ms=flops / rate * 1e3,
                         floor_at_peak_ms=flops / peak * 1e3 if peak else None)
        hidden.grad = weight.grad = None
    row["speedup_fwd_bwd"] = row["reference"]["fwd_bwd_ms"] / row["triton"]["fwd_bwd_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("benchmarks")
    parser.add_argument("--out", type=Path, default=default_out, help="folder for bench_cross_entropy_<gpu>.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    errs = check()
    print("fused vs PyTorch path, relative errors: " + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()))
    rate = matmul_rate()
    print(f"cuBLAS bf16 on one chunk's logits matmul: {rate / 1e12:.0f} TFLOP/s"
          + (f" (peak {peak / 1e12:.0f})" if peak else ""))
    rows = [bench(T, peak, rate) for T in args.lengths]
    print(f"{'tokens':>8}  {'ref f+b':>8} {'ours f+b':>8} {'x':>5}  {'floor ref/ours':>15}  "
          f"{'no-grad ref/ours':>17}  {'GiB ref/ours':>13}")
    for r in rows:
        ref, ours = r["reference"], r["triton"]
        print(f"{r['tokens']:>8}  {ref['fwd_bwd_ms']:>8.2f} {ours['fwd_bwd_ms']:>8.2f} {r['speedup_fwd_bwd']:>5.2f}  "
              f"{ref['floor_at_cublas_ms']:>7.2f}/{ours['floor_at_cublas_ms']:<7.2f}  "
              f"{ref['no_grad_ms']:>8.2f}/{ours['no_grad_ms']:<8.2f}  "
              f"{ref['peak_extra_gib']:>6.2f}/{ours['peak_extra_gib']:<6.2f}")
    print("ms, median of CUDA-event timings; floor: the matmul FLOPs at the cuBLAS rate above")
    path = write_record(args.out, "bench_cross_entropy", gpu,
                        settings=dict(d_model=D_MODEL, vocab=VOCAB, chunk=CHUNK, hidden="bf16", weight="fp32",
                                      ignored=IGNORED, loss="sum / tokens"),
                        check_rel_err=errs, cublas_flops=rate, peak_bf16_flops=peak, rows=rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
