"""Fused RMSNorm and gated RMSNorm in Triton: forward and backward, deterministic.

One kernel pair serves both norms: ``HAS_Z`` gates the input with silu(z)
before the norm (Mamba-2), and a plain RMSNorm is the case of one group of
``dim`` channels. Each direction reads its inputs once and writes its outputs
once; the forward keeps only the fp32 inverse RMS per (row, group) for the
backward, which recomputes the gated and normalised values from the inputs.
The maths is in README.md.

Vocabulary as in flash-linear-attention: ``i_`` program ids, ``o_`` offsets,
``m_`` masks, ``p_`` pointers, ``b_`` block values. Row offsets are int64
(1M tokens x 3072 channels is past 2^31 elements).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..settings import INTERPRET, cdiv, new_buffer, next_power_of_2

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A group is one tile of BN = next_power_of_2(group_size) channels: register
# pressure limits it (16 warps hold 32 fp32 values a thread per block value).
MAX_GROUP_SIZE = 16384
# Elements of one (rows x channels) tile: rows are batched until a tile holds this many; and backward
# programs per SM (per group), each walking a run of row blocks. Chosen on an H200 (2048 / 8 against
# 1024-8192 / 2-16): the gated backward at 64k x 1536 bf16 takes 393 us against 580 at 4096 / 4.
TILE = 2048
BWD_PROGRAMS_PER_SM = 8


# ----------------------------------------------------------------------------- kernels


@triton.jit
def rms_norm_fwd_kernel(
    x, z, w, out, rstd,
    rows, eps,
    stride_x, stride_z, stride_out,
    G: tl.constexpr, N: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, HAS_Z: tl.constexpr,
):
    """One program per (block of BR rows, group): out = g * rstd * w, g = x (* silu(z))."""
    i_r, i_g = tl.program_id(0), tl.program_id(1)
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)  # [BR] rows, int64
    o_n = tl.arange(0, BN)  # [BN] channels of the group
    o_c = i_g * N + o_n  # [BN] channels of the row
    m_r = o_r < rows
    m = m_r[:, None] & (o_n < N)[None, :]  # [BR, BN]

    b_g = tl.load(x + o_r[:, None] * stride_x + o_c[None, :], mask=m, other=0.0).to(tl.float32)  # [BR, BN]
    if HAS_Z:
        b_z = tl.load(z + o_r[:, None] * stride_z + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        b_g = b_g * b_z * tl.sigmoid(b_z)
    b_rstd = tl.math.rsqrt(tl.sum(b_g * b_g, axis=1) / N + eps)  # [BR]
    b_w = tl.load(w + o_c, mask=o_n < N, other=0.0).to(tl.float32)  # [BN]
    b_out = b_g * b_rstd[:, None] * b_w[None, :]
    tl.store(out + o_r[:, None] * stride_out + o_c[None, :], b_out.to(out.dtype.element_ty), mask=m)
    tl.store(rstd + o_r * G + i_g, b_rstd, mask=m_r)


@triton.jit
def rms_norm_bwd_kernel(
    x, z, w, rstd, dout, dx, dz, dw_part,
    rows, blocks_per_program,
    stride_x, stride_z, stride_do, stride_dx, stride_dz,
    G: tl.constexpr, N: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, HAS_Z: tl.constexpr,
):
    """One program per (run of ``blocks_per_program`` row blocks, group).

    With xhat = g * rstd: dg = rstd * (w * dout - xhat * mean(xhat * w * dout)); the gate
    splits dg into dx = dg * silu(z) and dz = dg * x * silu'(z). The program's share of
    dw = sum over rows of dout * xhat goes to its own row of ``dw_part`` (no atomics).
    """
    i_p, i_g = tl.program_id(0), tl.program_id(1)
    o_n = tl.arange(0, BN)  # [BN]
    o_c = i_g * N + o_n  # [BN]
    m_n = o_n < N
    b_w = tl.load(w + o_c, mask=m_n, other=0.0).to(tl.float32)  # [BN]
    b_dw = tl.zeros([BN], dtype=tl.float32)
    for i in range(blocks_per_program):
        o_r = (i_p.to(tl.int64) * blocks_per_program + i) * BR + tl.arange(0, BR)  # [BR] int64
        m_r = o_r < rows
        m = m_r[:, None] & m_n[None, :]  # [BR, BN]
        b_x = tl.load(x + o_r[:, None] * stride_x + o_c[None, :], mask=m, other=0.0).to(tl.float32)  # [BR, BN]
        if HAS_Z:
            b_z = tl.load(z + o_r[:, None] * stride_z + o_c[None, :], mask=m, other=0.0).to(tl.float32)
            b_s = tl.sigmoid(b_z)
            b_g = b_x * b_z * b_s
        else:
            b_g = b_x
        b_rstd = tl.load(rstd + o_r * G + i_g, mask=m_r, other=0.0)  # [BR]
        # padded rows and channels load dout = 0: they add nothing to dw or to the mean
        b_do = tl.load(dout + o_r[:, None] * stride_do + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        b_xhat = b_g * b_rstd[:, None]
        b_wdo = b_do * b_w[None, :]
        b_dw += tl.sum(b_do * b_xhat, axis=0)
        b_mean = tl.sum(b_xhat * b_wdo, axis=1) / N  # [BR]
        b_dg = (b_wdo - b_xhat * b_mean[:, None]) * b_rstd[:, None]
        if HAS_Z:
            tl.store(dz + o_r[:, None] * stride_dz + o_c[None, :],
                     (b_dg * b_x * b_s * (1 + b_z * (1 - b_s))).to(dz.dtype.element_ty), mask=m)
            b_dg = b_dg * b_z * b_s
        tl.store(dx + o_r[:, None] * stride_dx + o_c[None, :], b_dg.to(dx.dtype.element_ty), mask=m)
    tl.store(dw_part + i_p.to(tl.int64) * (G * N) + o_c, b_dw, mask=m_n)


# ----------------------------------------------------------------------------- launchers


def _rows(t: Tensor, dim: int) -> Tensor:
    """(..., dim) -> (rows, dim) with unit channel stride; a view where the strides allow one."""
    t = t.reshape(-1, dim)
    return t if t.stride(-1) == 1 else t.contiguous()


def _tiles(x: Tensor, z: Tensor | None, weight: Tensor, group_size: int) -> dict:
    """Checks, and the tile: BN channels (one group) x BR rows."""
    dim = x.shape[-1]
    for name, t in (("x", x), ("z", z)):
        if t is not None and t.dtype not in DTYPES:
            raise TypeError(f"the rms_norm kernels take fp32, bf16 or fp16 {name}, got {t.dtype} "
                            "(float64 takes the PyTorch path: rms_norm_naive / gated_rms_norm_naive)")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z {tuple(z.shape)} and y {tuple(x.shape)} must have one shape")
    if weight.shape != (dim,):
        raise ValueError(f"weight must be ({dim},), got {tuple(weight.shape)}")
    if group_size <= 0 or dim % group_size:
        raise ValueError(f"group_size {group_size} must divide the last dim {dim}")
    if group_size > MAX_GROUP_SIZE:
        raise ValueError(f"group_size up to {MAX_GROUP_SIZE} is supported (one tile per group), got {group_size}")
    BN = next_power_of_2(group_size)
    BR = max(1, TILE // BN)
    return dict(G=dim // group_size, N=group_size, BN=BN, BR=BR,
                num_warps=1 if INTERPRET else min(16, max(4, BR * BN // 512)))


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def rms_norm_fwd(x: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int) -> tuple[Tensor, Tensor]:
    """out (x.shape, x.dtype), rstd (*x.shape[:-1], groups) fp32."""
    k = _tiles(x, z, weight, group_size)
    dim, lead = x.shape[-1], x.shape[:-1]
    out = new_buffer(*x.shape, device=x.device, dtype=x.dtype)
    rstd = new_buffer(*lead, k["G"], device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, rstd
    x2, out2 = _rows(x, dim), out.view(-1, dim)
    z2 = _rows(z, dim) if z is not None else x2
    rows = x2.shape[0]
    rms_norm_fwd_kernel[(cdiv(rows, k["BR"]), k["G"])](
        x2, z2, weight.contiguous(), out2, rstd,
        rows, eps, x2.stride(0), z2.stride(0), out2.stride(0),
        G=k["G"], N=k["N"], BR=k["BR"], BN=k["BN"], HAS_Z=z is not None, num_warps=k["num_warps"],
    )
    return out, rstd


def rms_norm_bwd(dout: Tensor, x: Tensor, z: Tensor | None, weight: Tensor, rstd: Tensor, eps: float,
                 group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """dx (x's shape and dtype), dz (z's, or empty), dweight (weight's)."""
    k = _tiles(x, z, weight, group_size)
    dim = x.shape[-1]
    dx = new_buffer(*x.shape, device=x.device, dtype=x.dtype)
    dz = new_buffer(*z.shape, device=z.device, dtype=z.dtype) if z is not None else x.new_empty(0)
    if dx.numel() == 0:
        return dx, dz, torch.zeros_like(weight)
    x2, do2, dx2 = _rows(x, dim), _rows(dout, dim), dx.view(-1, dim)
    z2, dz2 = (_rows(z, dim), dz.view(-1, dim)) if z is not None else (x2, dx2)
    rows = x2.shape[0]
    # Several programs per SM, each walking a run of row blocks and keeping its dw partial in registers:
    # the partials buffer stays small (programs x dim fp32) and its sum by torch is deterministic.
    blocks = cdiv(rows, k["BR"])
    programs = min(blocks, cdiv(BWD_PROGRAMS_PER_SM * _sm_count(x.device), k["G"]))
    per_program = cdiv(blocks, programs)
    programs = cdiv(blocks, per_program)
    dw_part = new_buffer(programs, dim, device=x.device, dtype=torch.float32)
    rms_norm_bwd_kernel[(programs, k["G"])](
        x2, z2, weight.contiguous(), rstd, do2, dx2, dz2, dw_part,
        rows, per_program, x2.stride(0), z2.stride(0), do2.stride(0), dx2.stride(0), dz2.stride(0),
        G=k["G"], N=k["N"], BR=k["BR"], BN=k["BN"], HAS_Z=z is not None, num_warps=k["num_warps"],
    )
    return dx, dz, dw_part.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mambatrain::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: Tensor, z: Optional[Tensor], weight: Tensor, eps: float, group_size: int) -> tuple[Tensor, Tensor]:
    return rms_norm_fwd(x, z, weight, eps, group_size)


@_rms_norm_fwd.register_fake
def _(x, z, weight, eps, group_size):
    groups = x.shape[-1] // group_size
    return x.new_empty(x.shape), x.new_empty(*x.shape[:-1], groups, dtype=torch.float32)


@torch.library.custom_op("mambatrain::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dout: Tensor, x: Tensor, z: Optional[Tensor], weight: Tensor, rstd: Tensor, eps: float,
                  group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    return rms_norm_bwd(dout, x, z, weight, rstd, eps, group_size)


@_rms_norm_bwd.register_fake
def _(dout, x, z, weight, rstd, eps, group_size):
    return x.new_empty(x.shape), z.new_empty(z.shape) if z is not None else x.new_empty(0), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, z, weight, eps, group_size = inputs
    ctx.save_for_backward(x, z, weight, output[1])
    ctx.eps, ctx.group_size = eps, group_size
    ctx.set_materialize_grads(False)  # rstd's gradient (never used) arrives as None, not a zero tensor


def _backward(ctx, dout, _drstd):
    x, z, weight, rstd = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    dx, dz, dweight = torch.ops.mambatrain.rms_norm_bwd(dout, x, z, weight, rstd, ctx.eps, ctx.group_size)
    return dx, dz if z is not None else None, dweight, None, None


torch.library.register_autograd("mambatrain::rms_norm_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public functions


def _check_device(t: Tensor) -> None:
    if not (t.is_cuda or INTERPRET):
        raise RuntimeError("the rms_norm kernels run on CUDA tensors (or under TRITON_INTERPRET=1); "
                           "use rms_norm_naive / gated_rms_norm_naive on CPU")


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm on Triton kernels; results as ``rms_norm_naive``.

        out = x * rsqrt(mean(x^2) + eps) * weight        (mean over the last dim, in fp32)

    Shapes: x (..., dim), any strides with a unit channel stride (others are copied);
    weight (dim,). x is fp32, bf16 or fp16; weight any float dtype (used in fp32).
    Returns (..., dim) in x's dtype; x and weight get gradients.
    """
    _check_device(x)
    return torch.ops.mambatrain.rms_norm_fwd(x, None, weight, eps, x.shape[-1])[0]


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-5, group_size: int | None = None) -> Tensor:
    """Mamba-2's gated RMSNorm on Triton kernels; results as ``gated_rms_norm_naive``.

        g = y * silu(z);  out = g * rsqrt(mean_group(g^2) + eps) * weight      (in fp32)

    The mean runs over each group of ``group_size`` consecutive channels (default: all).
    Shapes: y, z (..., dim), strided views welcome (z is usually a slice of the
    in-projection); weight (dim,). Returns (..., dim) in y's dtype; y, z and weight get gradients.
    """
    _check_device(y)
    return torch.ops.mambatrain.rms_norm_fwd(y, z, weight, eps, group_size or y.shape[-1])[0]
