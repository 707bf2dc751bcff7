"""Benchmark the fused Mamba block kernels (causal conv1d + SiLU, gated RMSNorm) on a GPU, after checking them.

    python scripts/bench_fused.py --out benchmarks/

Shapes are those of the ~130M Mamba-2 of scripts/bench_scaling.py (d_model 768, expand 2, d_state 128, 24 heads):
the convolution runs over 1536 + 2 * 128 = 1792 channels (width 4), sliced out of the in-projection's output as
the model does (a strided view); the gated norm over 1536 channels, its gate z a slice of the same output.
For each length: the Triton kernel against the model's PyTorch path (cuDNN depthwise conv1d + SiLU; the norm in
fp32 torch ops), outputs and every gradient, then forward and forward+backward times (CUDA events, medians, bf16,
random inputs), with the bytes each must move at least (inputs read once, outputs written once) and the
achieved GB/s against this GPU's copy rate. JSON with the GPU, commit and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch import nn

from mambatrain.models.blocks.mamba import causal_conv1d
from mambatrain.models.blocks.norm import GatedRMSNorm
from mambatrain_kernels.conv1d import causal_conv1d_silu
from mambatrain_kernels.rmsnorm import gated_rms_norm

LENGTHS = [16384, 65536, 262144, 1048576]
D_INNER, D_STATE, HEADS, WIDTH = 1536, 128, 24, 4
CONV_CHANNELS = D_INNER + 2 * D_STATE
IN_PROJ = D_INNER + CONV_CHANNELS + HEADS  # z, xBC, dt
BF16 = 2


def timed(fn, budget_ms: float = 300) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=budget_ms, return_mode="median")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item() if torch.isfinite(out).all() else float("nan")


def copy_rate() -> float:
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / timed(lambda: dst.copy_(src)) / 1e9  # GB/s, read + write


def in_proj_output(length: int) -> torch.Tensor:
    return torch.randn(1, length, IN_PROJ, device="cuda", dtype=torch.bfloat16)


def measure(name: str, ours, reference, inputs: list[torch.Tensor], floor_fwd: float, floor_fwdbwd: float,
            gbps: float) -> dict:
    """Check ``ours`` against ``reference`` (outputs and input gradients), then time both."""
    grad_out = None
    results = {}
    for label, fn in (("ours", ours), ("pytorch", reference)):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        results[label] = [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]
    errors = [rel_err(a.float(), b.float()) for a, b in zip(results["ours"], results["pytorch"])]
    row = {"op": name, "max_rel_err_vs_pytorch": max(errors)}
    for label, fn in (("ours", ours), ("pytorch", reference)):
        leaves = [t.detach().requires_grad_() for t in inputs]
        with torch.no_grad():
            fwd = timed(lambda: fn(*leaves))
        fwdbwd = timed(lambda: torch.autograd.grad(fn(*leaves), leaves, grad_out))  # no accumulation into .grad
        row[label] = {"fwd_ms": fwd, "fwdbwd_ms": fwdbwd,
                      "fwd_GBps_of_floor": floor_fwd / fwd / 1e6, "fwdbwd_GBps_of_floor": floor_fwdbwd / fwdbwd / 1e6}
    row["floor_ms"] = {"fwd": floor_fwd / gbps / 1e6, "fwdbwd": floor_fwdbwd / gbps / 1e6}
    return row


class _DepthwiseConv(nn.Module):
    """What ``causal_conv1d`` reads of an nn.Conv1d, around given tensors (so their gradients are the ones compared)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.kernel_size, self.groups = (weight.shape[1],), weight.shape[0]
        self.weight, self.bias = weight[:, None, :], bias


def conv_rows(length: int, gbps: float) -> dict:
    proj = in_proj_output(length)
    xBC = proj[..., D_INNER: D_INNER + CONV_CHANNELS]  # a strided view, as in the model
    weight = torch.randn(CONV_CHANNELS, WIDTH, device="cuda") / WIDTH ** 0.5
    bias = 0.1 * torch.randn(CONV_CHANNELS, device="cuda")

    def ours(x, w, b):
        return causal_conv1d_silu(x, w, b)

    def pytorch(x, w, b):
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as in training (bf16-mixed)
            return F.silu(causal_conv1d(x, _DepthwiseConv(w, b), None))

    tokens = length * CONV_CHANNELS * BF16
    # forward: read x, write y; backward: read x and dy, write dx (the weight terms are per channel)
    return measure("conv1d_silu", ours, pytorch, [xBC, weight, bias], 2 * tokens, 5 * tokens, gbps)


def norm_rows(length: int, gbps: float) -> dict:
    proj = in_proj_output(length)
    z = proj[..., :D_INNER]
    y = torch.randn(1, length, D_INNER, device="cuda", dtype=torch.bfloat16)
    weight = 1 + 0.1 * torch.randn(D_INNER, device="cuda")
    eps = GatedRMSNorm(D_INNER).eps

    def ours(y, z, w):
        return gated_rms_norm(y, z, w, eps, D_INNER)

    def pytorch(y, z, w):
        return _gated_norm_torch(y, z, w, eps)

    tokens = length * D_INNER * BF16
    # forward: read y, z, write out; backward: read y, z, dout, write dy, dz
    return measure("gated_rms_norm", ours, pytorch, [y, z, weight], 3 * tokens, 8 * tokens, gbps)


def _gated_norm_torch(y, z, weight, eps):
    """GatedRMSNorm's PyTorch path (models/blocks/norm.py) with an explicit weight."""
    gated = y.float() * F.silu(z.float())
    gated = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps)
    return (gated * weight).to(y.dtype)


def environment() -> dict:
    commit = os.environ.get("MAMBATRAIN_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    return {"gpu": torch.cuda.get_device_name(), "commit": commit, "date": datetime.datetime.now().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks"), help="folder for bench_fused.json")
    parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    args = parser.parse_args()
    torch.manual_seed(0)
    gbps = copy_rate()
    results = {"environment": environment(), "copy_GBps": gbps, "rows": []}
    print(results["environment"], f"copy {gbps:.0f} GB/s")
    for length in args.lengths:
        for rows in (conv_rows, norm_rows):
            row = rows(length, gbps) | {"length": length}
            results["rows"].append(row)
            o, p = row["ours"], row["pytorch"]
            print(f"{row['op']:<15}{length:>9,}  err {row['max_rel_err_vs_pytorch']:.1e}  "
                  f"ours fwd {o['fwd_ms']:7.3f} fwd+bwd {o['fwdbwd_ms']:7.3f} ms  "
                  f"pytorch {p['fwd_ms']:7.3f} / {p['fwdbwd_ms']:7.3f} ms  "
                  f"floor {row['floor_ms']['fwd']:.3f} / {row['floor_ms']['fwdbwd']:.3f} ms", flush=True)
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_fused.json").write_text(json.dumps(results, indent=1))
    print("wrote", out / "bench_fused.json")


if __name__ == "__main__":
    main()
