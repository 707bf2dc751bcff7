"""Benchmark mambatrain's scan kernels on a GPU, after checking them against their references.

    python scripts/bench_scan.py --out benchmarks/            # full run (a few minutes on an H100)
    python scripts/bench_scan.py --quick                      # correctness + our kernels only

What it does, in order:
1. Measures the two ceilings of this GPU (device-to-device copy, bf16 matmul).
2. Checks each Triton kernel against its PyTorch reference on the GPU: outputs and every gradient at an
   odd length, and the forward output and final state at 1M tokens (reference computed window by window).
3. Times forward and forward+backward (bf16) at lengths 4k ... 1M, each in a batch of 1M tokens (--tokens; 4k x
   256, 16k x 64, ..., 1M x 1: the GPU does the same work at every length, the host's time to issue a call hides
   behind it) for
   - SSD (Mamba-2): 24 heads x 64, d_state 128: ours in chunks of 64 (the recipes' setting), mamba_ssm's
     `mamba_chunk_scan_combined` in chunks of 256 (its default; if its source is on MAMBA_SSM_SRC), fla's
     `chunk_simple_gla` (if installed), causal SDPA at the same width;
   - selective scan (Mamba-1): 1536 channels, d_state 16: ours, and mamba_ssm's CUDA `selective_scan_fn` (if
     MAMBA_SSM_CUDA_BUILD names a build of scripts/build_peer_selective_scan.py and MAMBA_SSM_SRC its source).
   Reports ms (median of CUDA-event timings), tokens/s, achieved GB/s against the bytes floor, peak memory,
   and, for batches of up to 64k tokens, the CPU time one forward+backward call takes to issue (with
   ``--tokens 0``, batch 1 at every length, the GPU waits on it at short lengths).
4. Writes JSON (GPU name, commit, date, versions) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from mambatrain_kernels.selective_scan.naive import selective_scan_naive
from mambatrain_kernels.selective_scan.triton import selective_scan
from mambatrain_kernels.ssd.naive import ssd_naive
from mambatrain_kernels.ssd.triton import ssd_scan

from gpu_timing import peak_extra_gib, timed
from provenance import commit

LENGTHS = [4096, 16384, 65536, 262144, 1048576]
SSD_SHAPE = dict(heads=24, head_dim=64, d_state=128, groups=1, chunk=64)
PEER = dict(chunk=256)  # mamba_ssm's default chunk, and the one of its anchors in shared/GPU-NOTES.md
SEL_SHAPE = dict(channels=1536, d_state=16, groups=1)
EXP_PER_S = 3.9e12  # measured exponential throughput of an H100 (shared/GPU-NOTES.md); Mamba-1's floor


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


# ------------------------------------------------------------------------------------------------ ceilings

def ceilings() -> dict:
    n = 2**30 // 2  # 1 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = timed(lambda: a @ b)
    return {"copy_TBps": 2 * n * 2 / copy_ms / 1e9, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


# ------------------------------------------------------------------------------------------------ inputs

def ssd_inputs(length: int, dtype=torch.bfloat16, batch: int = 1, requires_grad=False, seed=0):
    s = SSD_SHAPE
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, device="cuda", generator=g) * scale)
    x = r(batch, length, s["heads"], s["head_dim"]).to(dtype)
    dt = r(batch, length, s["heads"], scale=0.5).sub(2.0).to(dtype)  # softplus(dt + bias) ~ 0.01 .. 0.5
    A = -torch.exp(r(s["heads"], scale=0.5))
    B = r(batch, length, s["groups"], s["d_state"], scale=s["d_state"] ** -0.5).to(dtype)
    C = r(batch, length, s["groups"], s["d_state"], scale=s["d_state"] ** -0.5).to(dtype)
    D = r(s["heads"])
    dt_bias = r(s["heads"], scale=0.5)
    tensors = [x, dt, A, B, C, D, dt_bias]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors


def sel_inputs(length: int, dtype=torch.bfloat16, batch: int = 1, requires_grad=False, seed=0, with_z=True,
               channels: int | None = None):
    s = dict(SEL_SHAPE, channels=channels or SEL_SHAPE["channels"])
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, device="cuda", generator=g) * scale)
    x = r(batch, length, s["channels"]).to(dtype)
    dt = r(batch, length, s["channels"], scale=0.5).sub(2.0).to(dtype)
    A = -torch.exp(r(s["channels"], s["d_state"], scale=0.5))
    B = r(batch, length, s["groups"], s["d_state"]).to(dtype)
    C = r(batch, length, s["groups"], s["d_state"]).to(dtype)
    D = r(s["channels"])
    z = r(batch, length, s["channels"]).to(dtype) if with_z else None
    dt_bias = r(s["channels"], scale=0.5)
    tensors = [x, dt, A, B, C, D, z, dt_bias]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tensors


# ------------------------------------------------------------------------------------------------ long references

def windowed_reference(naive, x, dt, A, B, C, D, z, dt_bias, window: int, per_head: bool):
    """The naive loop over a long sequence, exactly, with every window's loop run in parallel.

    Pass 1 runs each window from a zero state (windows folded into the batch); the windows' end states
    are chained in order (h_end = decay_total * h_start + local_end); pass 2 reruns each window from its
    true start state. Float32, no gradients; batch must be 1.
    """
    length = x.shape[1]
    assert x.shape[0] == 1 and length % window == 0
    n = length // window
    fold = lambda t: None if t is None else t.reshape(n, window, *t.shape[2:])
    xs, dts, Bs, Cs, zs = (fold(t.float()) if t is not None else None for t in (x, dt, B, C, z))
    _, local_end = naive(xs, dts, A, Bs, Cs, None, None, dt_bias, True, return_final_state=True)
    step = F.softplus(dts + dt_bias)  # (n, window, channels or heads)
    total = step.sum(1)
    decay = torch.exp(total[..., None] * A) if not per_head else torch.exp(total * A)[..., None, None]
    starts = torch.zeros_like(local_end)
    for w in range(1, n):
        starts[w] = decay[w - 1] * starts[w - 1] + local_end[w - 1]
    final = decay[-1] * starts[-1] + local_end[-1]
    y = naive(xs, dts, A, Bs, Cs, D, zs, dt_bias, True, initial_state=starts)
    return y.reshape(x.shape).float(), final[None]


# ------------------------------------------------------------------------------------------------ correctness

def check_ssd(odd_length: int, long_length: int, mamba=None) -> dict:
    """Our SSD kernel (and mamba_ssm's, when given) against the float64 loop on the same rounded inputs."""
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, dt, A, B, C, D, dt_bias = ssd_inputs(odd_length, dtype, requires_grad=True, seed=1)
        h0 = torch.randn(1, SSD_SHAPE["heads"], SSD_SHAPE["head_dim"], SSD_SHAPE["d_state"], device="cuda",
                         requires_grad=True)
        inputs = [x, dt, A, B, C, D, dt_bias, h0]
        y, final = ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, initial_state=h0,
                            return_final_state=True, chunk_size=SSD_SHAPE["chunk"])
        up = [t.detach().double().requires_grad_(True) for t in inputs]
        y_ref, final_ref = ssd_naive(up[0], up[1], up[2], up[3], up[4], D=up[5], dt_bias=up[6], dt_softplus=True,
                                     initial_state=up[7], return_final_state=True)
        dy, dfinal = torch.randn_like(y_ref), torch.randn_like(final_ref)
        grads = torch.autograd.grad((y, final), inputs, (dy.to(y.dtype), dfinal.float()))
        grads_ref = torch.autograd.grad((y_ref, final_ref), up, (dy, dfinal))
        names = ["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"]
        errors = {"y": rel_err(y, y_ref), "final_state": rel_err(final, final_ref)}
        errors.update({f"d{n}": rel_err(g, gr) for n, g, gr in zip(names, grads, grads_ref)})
        result[f"odd_length_{odd_length}_{str(dtype).split('.')[-1]}"] = errors
        if mamba is not None:  # the same comparison for the peer: what precision its users get
            key = f"mamba_ssm_odd_length_{odd_length}_{str(dtype).split('.')[-1]}"
            try:
                y, final = mamba(x, dt, A, B, C, PEER["chunk"], D=D, dt_bias=dt_bias, dt_softplus=True,
                                 initial_states=h0, return_final_states=True)
                grads = torch.autograd.grad((y, final), inputs, (dy.to(y.dtype), dfinal.to(final.dtype)))
                errors = {"y": rel_err(y, y_ref), "final_state": rel_err(final, final_ref)}
                errors.update({f"d{n}": rel_err(g, gr) for n, g, gr in zip(names, grads, grads_ref)})
                result[key] = errors
            except Exception as error:  # the peer's failure is a result too
                result[key] = f"failed: {' '.join(str(error).split())[:300]}"
    with torch.no_grad():
        x, dt, A, B, C, D, dt_bias = ssd_inputs(long_length, torch.bfloat16, seed=2)
        y, final = ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, return_final_state=True,
                            chunk_size=SSD_SHAPE["chunk"])
        y_ref, final_ref = windowed_reference(ssd_naive, x, dt, A, B, C, D, None, dt_bias, 256, per_head=True)
        result[f"length_{long_length}_bf16_forward"] = {"y": rel_err(y, y_ref), "final_state": rel_err(final, final_ref)}
    return result


def check_selective(odd_length: int, long_length: int, mamba=None) -> dict:
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        inputs = sel_inputs(odd_length, dtype, requires_grad=True, seed=3)
        x, dt, A, B, C, D, z, dt_bias = inputs
        h0 = torch.randn(1, SEL_SHAPE["channels"], SEL_SHAPE["d_state"], device="cuda", requires_grad=True)
        y, final = selective_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, initial_state=h0,
                                  return_final_state=True)
        up = [t.detach().double().requires_grad_(True) for t in inputs + [h0]]
        y_ref, final_ref = selective_scan_naive(up[0], up[1], up[2], up[3], up[4], D=up[5], z=up[6], dt_bias=up[7],
                                                dt_softplus=True, initial_state=up[8], return_final_state=True)
        dy, dfinal = torch.randn_like(y_ref), torch.randn_like(final_ref)
        grads = torch.autograd.grad((y, final), inputs + [h0], (dy.to(y.dtype), dfinal.float()))
        grads_ref = torch.autograd.grad((y_ref, final_ref), up, (dy, dfinal))
        names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]
        errors = {"y": rel_err(y, y_ref), "final_state": rel_err(final, final_ref)}
        errors.update({f"d{n}": rel_err(g, gr) for n, g, gr in zip(names, grads, grads_ref)})
        result[f"odd_length_{odd_length}_{str(dtype).split('.')[-1]}"] = errors
        if mamba is not None:  # the peer has no initial state: its reference starts from zero
            key = f"mamba_ssm_odd_length_{odd_length}_{str(dtype).split('.')[-1]}"
            try:
                y_ref = selective_scan_naive(up[0], up[1], up[2], up[3], up[4], D=up[5], z=up[6], dt_bias=up[7],
                                             dt_softplus=True)
                grads_ref = torch.autograd.grad(y_ref, up[:8], dy)
                theirs = peer_selective_inputs(*inputs)
                y = mamba(*theirs[:6], z=theirs[6], delta_bias=theirs[7], delta_softplus=True).transpose(1, 2)
                grads = from_peer_layout(torch.autograd.grad(y, theirs, dy.to(y.dtype)))
                errors = {"y": rel_err(y, y_ref)}
                errors.update({f"d{n}": rel_err(g, gr) for n, g, gr in zip(names, grads, grads_ref)})
                result[key] = errors
            except Exception as error:  # the peer's failure is a result too
                result[key] = f"failed: {' '.join(str(error).split())[:300]}"
    with torch.no_grad():
        # 256 of the 1536 channels: the float32 reference over 1M x 1536 needs more memory than the GPU has,
        # and channels are independent (what is checked is the carry over a million steps)
        x, dt, A, B, C, D, z, dt_bias = sel_inputs(long_length, torch.bfloat16, seed=4, channels=256)
        y, final = selective_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, return_final_state=True)
        y_ref, final_ref = windowed_reference(selective_scan_naive, x, dt, A, B, C, D, z, dt_bias, 256, per_head=False)
        result[f"length_{long_length}_bf16_forward"] = {"y": rel_err(y, y_ref), "final_state": rel_err(final, final_ref)}
    return result


# ------------------------------------------------------------------------------------------------ floors

def ssd_bytes(length: int) -> tuple[float, float]:
    s = SSD_SHAPE
    x = length * s["heads"] * s["head_dim"] * 2
    bc = 2 * length * s["groups"] * s["d_state"] * 2
    dt = length * s["heads"] * 2
    forward = x + bc + dt + x  # read x, B, C, dt; write y
    backward = (x + bc + dt + x) + (x + bc + dt)  # read x, B, C, dt, dy; write dx, dB, dC, ddt
    return forward, forward + backward


def sel_bytes(length: int) -> tuple[float, float]:
    s = SEL_SHAPE
    per = length * s["channels"] * 2
    bc = 2 * length * s["groups"] * s["d_state"] * 2
    forward = 3 * per + bc + per  # read x, dt, z, B, C; write y
    backward = (4 * per + bc) + (3 * per + bc)  # read x, dt, z, dy, B, C; write dx, ddt, dz, dB, dC
    return forward, forward + backward


def sel_exp_floor_ms(length: int, passes: int) -> float:
    return passes * length * SEL_SHAPE["channels"] * SEL_SHAPE["d_state"] / EXP_PER_S * 1e3


# ------------------------------------------------------------------------------------------------ peers

def register_mamba_ssm() -> str | None:
    """Make mamba_ssm's source on MAMBA_SSM_SRC importable; None, or why it is not."""
    src = os.environ.get("MAMBA_SSM_SRC")
    if not src or not Path(src, "mamba_ssm").is_dir():
        return "MAMBA_SSM_SRC not set to a folder holding mamba_ssm/"
    # Its package __init__ imports the CUDA extension unguarded: register the package without running it.
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(Path(src, "mamba_ssm"))]
    sys.modules.setdefault("mamba_ssm", package)
    return None


def load_mamba_ssm():
    if (why := register_mamba_ssm()) is not None:
        return None, why
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as error:  # report, do not hide: the table says why the column is empty
        return None, f"import failed: {error!r}"
    return mamba_chunk_scan_combined, None


def load_mamba_ssm_selective():
    """mamba_ssm's Mamba-1 scan: its CUDA extension as scripts/build_peer_selective_scan.py builds it."""
    build = os.environ.get("MAMBA_SSM_CUDA_BUILD")
    if not build or not list(Path(build).glob("selective_scan_cuda*.so")):
        return None, "MAMBA_SSM_CUDA_BUILD not set to a build of scripts/build_peer_selective_scan.py"
    if (why := register_mamba_ssm()) is not None:
        return None, why
    sys.path.insert(0, build)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:
        return None, f"import failed: {error!r}"
    return selective_scan_fn, None


def peer_selective_inputs(x, dt, A, B, C, D, z, dt_bias):
    """Our inputs in mamba_ssm's layout, channels before time ((batch, channels, length); B, C (batch, groups,
    d_state, length)), as new leaves: the layout its Mamba module hands the kernel, so no copy is timed."""
    with torch.no_grad():
        moved = [x.transpose(1, 2), dt.transpose(1, 2), A, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D,
                 z.transpose(1, 2), dt_bias]
    return [t.contiguous().requires_grad_(True) for t in moved]


def from_peer_layout(grads):
    """mamba_ssm's gradients (in the order of peer_selective_inputs) in our layout."""
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias = grads
    return [dx.transpose(1, 2), ddt.transpose(1, 2), dA, dB.permute(0, 3, 1, 2), dC.permute(0, 3, 1, 2), dD,
            dz.transpose(1, 2), ddt_bias]


def load_fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as error:
        return None, f"import failed: {error!r}"
    return chunk_simple_gla, None


# ------------------------------------------------------------------------------------------------ timing

def fwd_bwd_runner(forward, inputs):
    params = [t for t in inputs if t is not None and t.requires_grad]
    out = forward()
    grad = torch.randn_like(out)
    del out

    def run():
        y = forward()
        torch.autograd.grad(y, params, grad)
    return run


def host_ms(run, repeats: int = 20) -> float:
    """Median CPU milliseconds to issue ``run`` onto an idle GPU: when a call's kernels take less, the GPU waits."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def batch_for(length: int, tokens: int) -> int:
    """Sequences per call: ``tokens`` in all where a whole sequence fits, else one; ``tokens`` 0 means one."""
    return max(1, tokens // length)


def time_ours(row: dict, ours, inputs, total_bytes: float, budget: float) -> None:
    """Forward, forward+backward, peak memory, achieved bandwidth and tokens/s of one of our kernels."""
    with torch.no_grad():
        row["ours_fwd_ms"] = timed(ours, budget)
    run = fwd_bwd_runner(ours, inputs)
    row["ours_fwdbwd_ms"] = timed(run, budget)
    tokens = row["batch"] * row["length"]
    if tokens <= 65536:
        row["ours_host_ms"] = host_ms(run)
    row["ours_peak_GiB"] = peak_extra_gib(run)
    row["ours_fwdbwd_GBps"] = total_bytes / row["ours_fwdbwd_ms"] / 1e6
    row["ours_tokens_per_s"] = tokens / row["ours_fwdbwd_ms"] * 1e3


def time_peer(row: dict, name: str, forward, inputs, total_bytes: float, budget: float) -> None:
    """Forward, forward+backward, peak memory and achieved bandwidth of a peer's kernel; running out of memory
    is a result too."""
    try:
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = timed(forward, budget)
        run = fwd_bwd_runner(forward, inputs)
        row[f"{name}_fwdbwd_ms"] = timed(run, budget)
        row[f"{name}_peak_GiB"] = peak_extra_gib(run)
        row[f"{name}_fwdbwd_GBps"] = total_bytes / row[f"{name}_fwdbwd_ms"] / 1e6
    except torch.OutOfMemoryError:
        row[f"{name}_fwdbwd_ms"] = "out of memory"
    torch.cuda.empty_cache()


def bench_ssd_row(length: int, batch: int, peers: dict, sdpa: bool = True) -> dict:
    row = {"length": length, "batch": batch}
    fwd_bytes, total_bytes = ssd_bytes(batch * length)  # the bytes scale with the tokens
    row["floor_fwd_ms"] = fwd_bytes / 3.0e12 * 1e3
    row["floor_fwdbwd_ms"] = total_bytes / 3.0e12 * 1e3
    budget = 300 if batch * length < 262144 else 800
    x, dt, A, B, C, D, dt_bias = inputs = ssd_inputs(length, batch=batch, requires_grad=True)
    chunk = SSD_SHAPE["chunk"]

    def ours():
        return ssd_scan(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, chunk_size=chunk)
    time_ours(row, ours, inputs, total_bytes, budget)

    mamba = peers.get("mamba_ssm")
    if mamba is not None:
        def theirs():
            return mamba(x, dt, A, B, C, PEER["chunk"], D=D, dt_bias=dt_bias, dt_softplus=True)
        time_peer(row, "mamba_ssm", theirs, inputs, total_bytes, budget)

    fla = peers.get("fla")
    if fla is not None:
        heads = SSD_SHAPE["heads"]
        with torch.no_grad():
            step = F.softplus(dt.float() + dt_bias)
            q = C.expand(-1, -1, heads, -1).contiguous().requires_grad_(True)
            k = B.expand(-1, -1, heads, -1).contiguous().requires_grad_(True)
            v = (x * step[..., None]).to(x.dtype).contiguous().requires_grad_(True)
            g = (step * A).contiguous().requires_grad_(True)
        try:
            def gla():
                return fla(q, k, v, g, scale=1.0)[0]
            with torch.no_grad():
                row["fla_fwd_ms"] = timed(gla, budget)
            row["fla_fwdbwd_ms"] = timed(fwd_bwd_runner(gla, [q, k, v, g]), budget)
        except Exception as error:
            row["fla"] = f"refused: {' '.join(str(error).split())[:300]}"
        del q, k, v, g
        torch.cuda.empty_cache()

    if sdpa and length <= 131072:
        heads, head_dim = SSD_SHAPE["heads"], SSD_SHAPE["head_dim"]
        q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True)
                   for _ in range(3))
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def attention(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            try:
                row[f"{name}_fwdbwd_ms"] = timed(fwd_bwd_runner(attention, [q, k, v]), budget)
            except Exception as error:
                row[name] = f"failed: {' '.join(str(error).split())[:200]}"
        del q, k, v
    return row


def bench_selective_row(length: int, batch: int, mamba=None) -> dict:
    row = {"length": length, "batch": batch}
    tokens = batch * length
    fwd_bytes, total_bytes = sel_bytes(tokens)
    row["floor_fwd_ms"] = max(fwd_bytes / 3.0e12 * 1e3, sel_exp_floor_ms(tokens, 1))
    row["floor_fwdbwd_ms"] = max(total_bytes / 3.0e12 * 1e3, sel_exp_floor_ms(tokens, 2))
    budget = 300 if tokens < 262144 else 800
    x, dt, A, B, C, D, z, dt_bias = inputs = sel_inputs(length, batch=batch, requires_grad=True)

    def ours():
        return selective_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    time_ours(row, ours, inputs, total_bytes, budget)

    if mamba is not None:
        theirs = peer_selective_inputs(*inputs)
        del ours, inputs, x, dt, A, B, C, D, z, dt_bias  # our copies' memory back before the peer's run
        time_peer_selective(row, mamba, theirs, total_bytes, budget)
    return row


def time_peer_selective(row: dict, mamba, inputs, total_bytes: float, budget: float) -> None:
    u, delta, A, B, C, D, z, dt_bias = inputs

    def theirs():
        return mamba(u, delta, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True)
    time_peer(row, "mamba_ssm", theirs, inputs, total_bytes, budget)


# ------------------------------------------------------------------------------------------------ main

def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)[:12]


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    print(" | ".join(f"{c:>14}" for c in columns))
    for row in rows:
        print(" | ".join(f"{fmt(row.get(c)):>14}" for c in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks"), help="folder for bench_scan.json")
    parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    parser.add_argument("--tokens", type=int, default=1048576,
                        help="tokens a call (batch = tokens // length, at least 1); 0: batch 1 at every length")
    parser.add_argument("--quick", action="store_true", help="skip peers and the 1M correctness check")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ssd", "selective", "check", "sdpa"])
    parser.add_argument("--no-peers", action="store_true", help="time ours and SDPA only (peers autotune for minutes)")
    parser.add_argument("--peer-check", action=argparse.BooleanOptionalAction, default=True,
                        help="check mamba_ssm against the reference too (its autotuning then runs for fp32 as well)")
    parser.add_argument("--long-check", type=int, default=1048576, help="length of the long forward check")
    parser.add_argument("--ssd-chunk", type=int, default=SSD_SHAPE["chunk"], choices=[64, 128, 256],
                        help="chunk size of our SSD scan")
    parser.add_argument("--peer-chunk", type=int, default=PEER["chunk"], choices=[64, 128, 256],
                        help="chunk size of mamba_ssm's SSD scan")
    args = parser.parse_args()
    SSD_SHAPE["chunk"] = args.ssd_chunk
    PEER["chunk"] = args.peer_chunk

    torch.manual_seed(0)
    report = {
        "gpu": torch.cuda.get_device_name(), "commit": commit(short=False),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__,
        "autotune": os.environ.get("MAMBATRAIN_AUTOTUNE", "1"),
        "ssd_shape": SSD_SHAPE, "mamba_ssm_chunk": PEER["chunk"], "selective_shape": SEL_SHAPE,
        "tokens_per_call": args.tokens, "dtype": "bfloat16",
    }
    report["ceilings"] = ceilings()
    print(json.dumps({k: report[k] for k in ("gpu", "commit", "torch", "triton", "ceilings")}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    name = "bench_scan.json" if args.ssd_chunk == 64 else f"bench_scan_chunk{args.ssd_chunk}.json"

    def save():
        (out / name).write_text(json.dumps(report, indent=1))

    long_length = 65536 if args.quick else args.long_check
    check = "check" not in args.skip
    # SSD first, then the selective scan: each part is saved as soon as it is done
    if "ssd" not in args.skip:
        peers = {}
        if not args.quick and not args.no_peers:
            peers["mamba_ssm"], report["mamba_ssm_status"] = load_mamba_ssm()
            peers["fla"], report["fla_status"] = load_fla()
        if check:
            report["check_ssd"] = check_ssd(4099, long_length, peers.get("mamba_ssm") if args.peer_check else None)
            print("ssd check:", json.dumps(report["check_ssd"]), flush=True)
            save()
        if peers.get("mamba_ssm") is not None:  # its first call autotunes for over a minute: keep that out of timings
            x, dt, A, B, C, D, dt_bias = ssd_inputs(8192, requires_grad=True)
            fwd_bwd_runner(lambda: peers["mamba_ssm"](x, dt, A, B, C, PEER["chunk"], D=D, dt_bias=dt_bias,
                                                      dt_softplus=True), [x, dt, A, B, C, D, dt_bias])()
        report["ssd"] = []
        for length in args.lengths:
            report["ssd"].append(bench_ssd_row(length, batch_for(length, args.tokens), peers, "sdpa" not in args.skip))
            torch.cuda.empty_cache()  # the row's inputs went with its function: give their memory back
            print("ssd", json.dumps(report["ssd"][-1]), flush=True)
            save()
    if "selective" not in args.skip:
        mamba = None
        if not args.quick and not args.no_peers:
            mamba, report["mamba_ssm_selective_status"] = load_mamba_ssm_selective()
        if check:
            report["check_selective"] = check_selective(4099, long_length, mamba if args.peer_check else None)
            print("selective check:", json.dumps(report["check_selective"]), flush=True)
            save()
        report["selective"] = []
        for length in args.lengths:
            report["selective"].append(bench_selective_row(length, batch_for(length, args.tokens), mamba))
            torch.cuda.empty_cache()
            print("selective", json.dumps(report["selective"][-1]), flush=True)
            save()

    if report.get("ssd"):
        print_table(f"SSD (Mamba-2) fwd+bwd, bf16, {args.tokens or 'batch 1'} tokens a call, 24x64 heads, d_state 128, "
                    f"chunk {SSD_SHAPE['chunk']} (mamba_ssm {PEER['chunk']}) (ms)", report["ssd"],
                    ["length", "batch", "floor_fwdbwd_ms", "ours_fwd_ms", "ours_fwdbwd_ms", "ours_host_ms",
                     "mamba_ssm_fwdbwd_ms", "fla_fwdbwd_ms", "sdpa_cudnn_fwdbwd_ms", "ours_peak_GiB"])
    if report.get("selective"):
        print_table(f"Selective scan (Mamba-1) fwd+bwd, bf16, {args.tokens or 'batch 1'} tokens a call, 1536 channels, "
                    "d_state 16 (ms)", report["selective"],
                    ["length", "batch", "floor_fwdbwd_ms", "ours_fwd_ms", "ours_fwdbwd_ms", "mamba_ssm_fwd_ms",
                     "mamba_ssm_fwdbwd_ms", "ours_peak_GiB", "mamba_ssm_peak_GiB"])
    save()


if __name__ == "__main__":
    main()
