"""Mamba-2 (SSD) chunked scan in Triton: forward and backward, deterministic.

Kernels live in ``triton_fwd.py`` / ``triton_bwd.py``; this file holds the host
launchers, the ``torch.library`` custom ops (so ``torch.compile`` traces
through with ``fullgraph=True``), their autograd, and the public ``ssd_scan``.
The maths and the memory budget are in README.md.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from ..settings import INTERPRET, cdiv, new_buffer, next_power_of_2
from .chunked import document_ids
from .triton_bwd import (
    ssd_dcb_bwd_kernel,
    ssd_ddt_bwd_kernel,
    ssd_dx_bwd_kernel,
    ssd_dx_one_block_bwd_kernel,
    ssd_state_bwd_kernel,
)
from .triton_fwd import (
    ssd_bmm_fwd_kernel,
    ssd_chunk_cumsum_fwd_kernel,
    ssd_chain_kernel,
    ssd_output_fwd_kernel,
    ssd_output_one_block_fwd_kernel,
    ssd_state_fwd_kernel,
    ssd_state_output_fwd_kernel,
)

# ----------------------------------------------------------------------------- launchers


def _strides4(t: Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _tiles(x: Tensor, B: Tensor, chunk_size: int) -> dict:
    """Block sizes fixed by the shapes (the rest is autotuned)."""
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    L = chunk_size
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"ssd_scan takes fp32, bf16 or fp16 inputs, got {x.dtype}")
    if L < 64 or L > 256 or L & (L - 1):
        raise ValueError(f"chunk_size must be 64, 128 or 256, got {L}")
    if d_state > 256:
        raise ValueError(f"d_state up to 256 is supported, got {d_state}")
    if heads % groups:
        raise ValueError(f"heads ({heads}) must be divisible by groups ({groups})")
    # d_state is never tiled in the per-block kernels (it is a reduction or an
    # accumulator kept whole); a smaller time block keeps d_state 256 in registers.
    BT = 64 if d_state <= 128 else 32
    BN = max(16, next_power_of_2(d_state))
    BV = max(16, next_power_of_2(head_dim)) if head_dim <= 128 else 64
    fp32 = x.dtype == torch.float32
    return dict(L=L, NT=cdiv(length, L), BT=BT, NB=L // BT, BN=BN, BV=BV,
                precision="ieee" if fp32 or not TF32 else "tf32", precise=fp32)


# bf16/fp16 inputs: products of two fp32 operands on tensor cores as tf32 (fp32 inputs always
# use exact fp32). MAMBATRAIN_TF32=0 makes them exact too, to tell tf32 rounding from other error.
TF32 = os.environ.get("MAMBATRAIN_TF32", "1") == "1"

# Chunks of one time block with one head-dimension tile (chunk 64 at d_state <= 128, head_dim <= 128) take
# ssd_dx_one_block_bwd_kernel instead of the general ssd_dx_bwd_kernel. On an H100, autotuned, 1M tokens in chunks
# of 64: forward+backward 59.6 -> 55.4 ms (benchmarks/profile_scan_1m_h100.json); every autotune config passed the
# kernel tests there (benchmarks/gpu_checks_walk_one_block_h100.json).
# MAMBATRAIN_SSD_ONE_BLOCK_BWD=0 takes the general kernel.
ONE_BLOCK_BWD = os.environ.get("MAMBATRAIN_SSD_ONE_BLOCK_BWD", "1") == "1"
# ssd_dcb_bwd_kernel forms the diagonal block's straddling sums of the decay gradient from cumulative sums along
# each row of Q instead of down its columns: the same sums in another order, 830 -> 585 instructions per head at
# chunk 64 offline; 55.5 -> 53.9 ms in the run above. MAMBATRAIN_SSD_DCB_ROW_SCAN=0 takes the columns.
DCB_ROW_SCAN = os.environ.get("MAMBATRAIN_SSD_DCB_ROW_SCAN", "1") == "1"

# The same chunks take ssd_output_one_block_fwd_kernel (the group's heads in a loop, the next head's tiles fetched
# while one computes) instead of ssd_output_fwd_kernel. On an H200, autotuned, in one process: 1M tokens forward +
# backward 50.4 -> 47.5 ms of kernels, 64k 3.27 -> 3.12 (benchmarks/ssd_one_block_output_h200.json); every autotune
# config passed the kernel tests there; on an H100 the output kernel takes 5.4 ms at 1M against 8.9
# (benchmarks/profile_scan_1m_defaults_h100.json). MAMBATRAIN_SSD_ONE_BLOCK_FWD=0 takes the general kernel.
ONE_BLOCK_FWD = os.environ.get("MAMBATRAIN_SSD_ONE_BLOCK_FWD", "1") == "1"
# Of those chunks, the ones whose whole state fits one program (head_dim x d_state up to 64 x 128) take
# ssd_state_output_fwd_kernel: the state walk's last pass writes y as it goes, instead of the output kernel reading
# x and the stored states back. On an H100, autotuned, 1M tokens forward + backward 38.3 -> 35.8 ms of kernels (the
# walk's last pass and the output 4.4 + 4.8 ms -> 6.6); every autotune config passed in bf16 and fp32, and the
# small-shape tests on the GPU (benchmarks/ssd_fused_output_h100.json). MAMBATRAIN_SSD_FUSED_OUTPUT=0 takes the
# walk and the output kernel apart.
FUSED_OUTPUT = os.environ.get("MAMBATRAIN_SSD_FUSED_OUTPUT", "1") == "1"

# Eager calls through a plain torch.autograd.Function (_SSDScan) instead of the custom op's dispatch; torch.compile
# traces the custom op either way. On a CPU with the launches stubbed out (scripts/bench_host.py) one forward +
# backward issues ~0.15-0.2 ms faster that way (benchmarks/bench_host_cpu.json); on GPUs, in one process each, the
# host side of one call took 2.64 against 2.75 ms (H100, 16k), 3.6 / 3.6 / 3.1 against 4.5 / 4.3 / 4.4 (H100,
# H200, H200; 1M) and 2.3 / 2.9 against 2.7 / 2.6 (H200, 64k) (benchmarks/profile_scan_*_h100.json,
# benchmarks/ssd_one_block_*_h200.json; one earlier A/B, one process per arm, had it slower). Its tests and the
# CUDA-graph capture tests (tests/models/test_graphed.py) passed through it on an H100
# (benchmarks/kernel_switches_fit_h100.json). MAMBATRAIN_SSD_EAGER_FUNCTION=0 takes the custom op in eager calls too.
EAGER_FUNCTION = os.environ.get("MAMBATRAIN_SSD_EAGER_FUNCTION", "1") == "1"

# The state kernels walk the chunks of each (batch, head) in order; to fill the GPU they split the walk into
# segments that run in parallel (batch x heads alone is 24 programs at batch 1). STATE_PROGRAMS: how many
# (batch x head, segment) walks run at once, None for two per SM (the fused state + output kernel's 64 x 128
# state takes ~255 registers at 4 warps: two programs per SM; the other state kernels' tiles fit as many walks).
STATE_PROGRAMS = None


def _segments(nt: int, batch_heads: int, device: torch.device) -> tuple[int, int]:
    """(chunks per segment, segments) of the state kernels.

    The walks run in waves of ``STATE_PROGRAMS``; the slowest wave's chunks set the time. A wave that is not
    full still takes a whole segment's time: at 256k tokens x 4 sequences on an H100, 3 segments made 288 walks
    for 264 places, and the second wave of 24 took the forward + backward from 35.5 ms (8 segments) to 41.7 (see
    benchmarks/bench_scan_autotuned_400e05f_h100.json). So the segment count minimizes
    waves x chunks per segment, plus a quarter for the first pass that several segments need (it reads x once
    more: ~1.6 ms of the fused forward's ~8 ms at 1M), fewest segments on a tie.
    """
    slots = STATE_PROGRAMS or 2 * _sm_count(device)

    def cost(nseg):
        return cdiv(nseg * batch_heads, slots) * cdiv(nt, nseg) * (5 if nseg > 1 else 4)
    # a few waves' worth of segments: beyond, the tail of the last wave is small and the first pass costs more
    nseg = min(range(1, min(nt, 4 * max(1, slots // batch_heads)) + 1), key=cost)
    seg = cdiv(nt, nseg)
    return seg, cdiv(nt, seg)


def _segmented(state_pass, h_in, has_in: bool, nseg: int, batch_heads: int, pn: int, reverse: bool, device):
    """Run a state kernel's walk over segments of chunks in parallel.

    ``state_pass(h_in, has_in, seg_local, seg_decay, local)`` launches the kernel. One segment: a plain walk
    from ``h_in``. Several: pass 1 (local) walks each segment from zero, pass 2 (``ssd_chain_kernel``) chains
    them into what enters every segment, pass 3 walks each segment from there.
    """
    if nseg == 1:
        state_pass(h_in, has_in, h_in, h_in, False)
        return
    seg_local = new_buffer(batch_heads, nseg, pn, device=device, dtype=torch.float32)
    seg_decay = new_buffer(batch_heads, nseg, device=device, dtype=torch.float32)
    state_pass(h_in, False, seg_local, seg_decay, True)
    starts = new_buffer(*seg_local.shape, device=device, dtype=torch.float32)
    ssd_chain_kernel[(cdiv(pn, 1024), batch_heads)](
        seg_local, seg_decay, h_in, starts, nseg, pn, HAS_IN=has_in, REVERSE=reverse, BLOCK=1024,
    )
    state_pass(starts, True, seg_local, seg_decay, False)


def _bucket(nt: int) -> int:
    """Autotuning key for the length (see ``triton_fwd.configs``)."""
    return next_power_of_2(nt)


def _s_dtype(x: Tensor) -> torch.dtype:
    """Storage of S = C B^T. bf16 halves the traffic of the most re-read
    intermediate (every head of the group reads it, forward and backward) for
    one more bf16 rounding (y: ~2.4e-3 -> 2.9e-3 relative). fp16 keeps fp32:
    its range is too small for long d_state sums."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


def _state_dtype(x: Tensor) -> torch.dtype:
    """Storage of the per-chunk snapshots of the state and of its gradient (written once, read by every row
    or column block of the chunk). Their readers use them as tensor-core operands in x's dtype, so bf16
    storage rounds nothing those products did not already round, and halves the bytes, the largest traffic
    of the scan at chunk 64-128. The walk itself carries the state in fp32 in registers; the final state is
    fp32. fp16 keeps fp32 (its range is too small for long sums), as fp32 inputs do."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _num_splits(x: Tensor, programs: int, heads_per_group: int) -> int:
    """Split a group's heads over programs until the per-group backward kernels fill the GPU."""
    sms = _sm_count(x.device)
    for d in range(1, heads_per_group + 1):
        if heads_per_group % d == 0 and programs * d >= 4 * sms:
            return d
    return heads_per_group


def _small(t: Tensor | None) -> Tensor | None:
    # per-head parameters may arrive as strided views; they are tiny
    return t.contiguous() if t is not None else None


def ssd_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, doc, chunk_size):
    A, D, dt_bias = _small(A), _small(D), _small(dt_bias)
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    k = _tiles(x, B, chunk_size)
    L, NT, BT, NB = k["L"], k["NT"], k["BT"], k["NB"]
    dev, f32 = x.device, torch.float32
    dtp = new_buffer(batch, heads, length, device=dev, dtype=f32)
    # (hi, lo) planes of the in-chunk cumsum; lo only for fp32 inputs (see the kernel)
    dA_cs = new_buffer(2 if k["precise"] else 1, batch, heads, length, device=dev, dtype=f32)
    BH = min(32, next_power_of_2(heads))
    ssd_chunk_cumsum_fwd_kernel[(NT, batch, cdiv(heads, BH))](
        dt, A, dt_bias if dt_bias is not None else A, dtp, dA_cs[0], dA_cs[-1],
        length, *dt.stride(), H=heads, L=L, BH=BH, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        PRECISE=k["precise"],
    )
    S = new_buffer(batch, groups, NT, L, L, device=dev, dtype=_s_dtype(x))
    ssd_bmm_fwd_kernel[(NT * NB, batch * groups)](
        C, B, S, length, NT, _bucket(NT), *C.stride(), *B.stride(),
        G=groups, N=d_state, L=L, BT=BT, BN=k["BN"], PRECISION=k["precision"],
    )
    states = new_buffer(batch, heads, NT, head_dim, d_state, device=dev, dtype=_state_dtype(x))
    final = new_buffer(batch, heads, head_dim, d_state, device=dev, dtype=f32)
    h0 = initial_state.float().contiguous() if initial_state is not None else final
    docp = doc if doc is not None else dtp

    seg, nseg = _segments(NT, batch * heads, dev)
    out = new_buffer(batch, length, heads, head_dim, device=dev, dtype=x.dtype)
    ypre = new_buffer(*out.shape, device=dev, dtype=x.dtype) if z is not None else out.new_empty(0)
    flags = dict(H=heads, G=groups, P=head_dim, N=d_state, L=L, BN=k["BN"], BV=k["BV"], HAS_D=D is not None,
                 D_2D=D is not None and D.dim() == 2, HAS_Z=z is not None, HAS_DOC=doc is not None,
                 PRECISE=k["precise"], PRECISION=k["precision"])
    one_block = ONE_BLOCK_FWD and NB == 1 and head_dim <= k["BV"]
    fused = one_block and FUSED_OUTPUT and k["BV"] * k["BN"] <= 64 * 128

    def grid_state(meta):
        return (cdiv(d_state, meta["BK"]), cdiv(head_dim, meta["BV"]), batch * heads * nseg)

    def state_pass(h_in, has_in, seg_local, seg_decay, local):
        if fused and not local:
            ssd_state_output_fwd_kernel[(nseg * batch * heads,)](
                x, z if z is not None else x, B, C, S, D if D is not None else A, dtp, dA_cs[0], dA_cs[-1], docp,
                h_in, states, final, out, ypre if z is not None else out,
                length, NT, _bucket(NT), seg, nseg, batch * heads, *x.stride(), *_strides4(z), *B.stride(),
                *C.stride(), HAS_INIT=has_in, **flags,
            )
            return
        ssd_state_fwd_kernel[grid_state](
            x, B, dtp, dA_cs[0], dA_cs[-1], docp, h_in, states, final, seg_local, seg_decay,
            length, NT, _bucket(NT), seg, nseg, *x.stride(), *B.stride(),
            H=heads, G=groups, P=head_dim, N=d_state, L=L,
            HAS_INIT=has_in, HAS_DOC=doc is not None, PRECISE=k["precise"], PRECISION=k["precision"], LOCAL=local,
        )
    _segmented(state_pass, h0, initial_state is not None, nseg, batch * heads, head_dim * d_state, False, dev)
    if fused:
        return out, final, ypre, states, dtp, dA_cs, S
    out_args = (x, z if z is not None else x, C, S, D if D is not None else A, dtp, dA_cs[0], dA_cs[-1], docp, states,
                out, ypre if z is not None else out)
    if one_block:
        hpg = heads // groups
        nsplit = _num_splits(x, NT * batch * groups, hpg)
        ssd_output_one_block_fwd_kernel[(NT * batch * groups * nsplit,)](
            *out_args, length, NT, _bucket(NT), batch * groups, *x.stride(), *_strides4(z), *C.stride(),
            NSPLIT=nsplit, HPS=hpg // nsplit, **flags,
        )
    else:
        ssd_output_fwd_kernel[(NT * batch * heads * cdiv(head_dim, k["BV"]),)](
            *out_args, length, NT, _bucket(NT), batch * heads, *x.stride(), *_strides4(z), *C.stride(), BT=BT, **flags,
        )
    return out, final, ypre, states, dtp, dA_cs, S


def ssd_bwd(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, doc, chunk_size,
            ypre, states, dtp, dA_cs, S):
    A, D, dt_bias = _small(A), _small(D), _small(dt_bias)
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    k = _tiles(x, B, chunk_size)
    L, NT, BT, NB = k["L"], k["NT"], k["BT"], k["NB"]
    dev, f32 = x.device, torch.float32
    docp = doc if doc is not None else dtp
    zp = z if z is not None else x

    dstates = new_buffer(batch, heads, NT, head_dim, d_state, device=dev, dtype=_state_dtype(x))
    dh0 = new_buffer(batch, heads, head_dim, d_state, device=dev, dtype=f32)
    dhT = dfinal.float().contiguous() if dfinal is not None else dh0
    # a slot per 32 x 32 piece of the state (tiles are 32, 64 or 128 wide; the kernel writes every slot)
    kc_tiles = cdiv(d_state, 32) * cdiv(head_dim, 32)
    Kc_part = new_buffer(batch, heads, NT, kc_tiles, device=dev, dtype=f32)

    seg, nseg = _segments(NT, batch * heads, dev)

    def grid_state(meta):
        return (cdiv(d_state, meta["BK"]), cdiv(head_dim, meta["BV"]), batch * heads * nseg)

    def state_pass(dh_in, has_in, seg_local, seg_decay, local):
        ssd_state_bwd_kernel[grid_state](
            dout, zp, C, dtp, dA_cs[0], docp, states, dh_in, dstates, dh0, Kc_part, seg_local, seg_decay,
            length, NT, _bucket(NT), seg, nseg, *dout.stride(), *_strides4(z), *C.stride(),
            H=heads, G=groups, P=head_dim, N=d_state, L=L, KC_TILES=kc_tiles,
            HAS_DFINAL=has_in, HAS_Z=z is not None, HAS_DOC=doc is not None, PRECISION=k["precision"], LOCAL=local,
        )
    # the backward walks the chunks (and segments) last to first
    _segmented(state_pass, dhT, dfinal is not None, nseg, batch * heads, head_dim * d_state, True, dev)

    hpg = heads // groups
    nsplit = _num_splits(x, NT * NB * batch * groups, hpg)
    dS = new_buffer(nsplit, batch, groups, NT, L, L, device=dev, dtype=x.dtype)
    # one split: write the final dtype directly; several: fp32 partials summed below
    part = f32 if nsplit > 1 else None
    dB_out = new_buffer(nsplit, batch, length, groups, d_state, device=dev, dtype=part or B.dtype)
    dC_out = new_buffer(nsplit, batch, length, groups, d_state, device=dev, dtype=part or C.dtype)
    dsum = new_buffer(batch, heads, length, device=dev, dtype=f32)
    grid_group = (NT * NB * batch * groups * nsplit,)
    common = dict(H=heads, G=groups, P=head_dim, N=d_state, L=L, BT=BT, BN=k["BN"], BV=k["BV"],
                  NSPLIT=nsplit, HPS=hpg // nsplit, HAS_Z=z is not None, HAS_DOC=doc is not None,
                  PRECISE=k["precise"], PRECISION=k["precision"])
    npair = NB * (NB + 1) // 2
    R_part = new_buffer(batch, heads, NT, npair, BT, device=dev, dtype=f32)
    # read for block pairs off the diagonal only: none when a chunk is one block
    K_pair = new_buffer(*R_part.shape, device=dev, dtype=f32) if NB > 1 else R_part
    T_pair = new_buffer(batch, heads, NT, npair, device=dev, dtype=f32) if NB > 1 else R_part
    dcb_args = (x, dout, zp, B, C, dtp, dA_cs[0], dA_cs[-1], docp, states, dS, dC_out, dsum, R_part, K_pair, T_pair,
                length, NT, _bucket(NT), batch * groups, *x.stride(), *dout.stride(), *_strides4(z), *B.stride(),
                *C.stride())
    ssd_dcb_bwd_kernel[grid_group](*dcb_args, ROW_SCAN=DCB_ROW_SCAN, **common)

    dx = new_buffer(batch, length, heads, head_dim, device=dev, dtype=x.dtype)
    dz = new_buffer(*dx.shape, device=dev, dtype=x.dtype) if z is not None else dx.new_empty(0)
    ddt_x = new_buffer(batch, heads, length, device=dev, dtype=f32)
    vsum = new_buffer(*ddt_x.shape, device=dev, dtype=f32)
    dD_part = new_buffer(batch, NT, NB, heads, head_dim, device=dev, dtype=f32) if D is not None else dsum
    dx_args = (x, dout, zp, ypre, B, C, S, dS, D if D is not None else A, dtp, dA_cs[0], dA_cs[-1], docp, dstates,
               dx, dz if z is not None else dx, dB_out, ddt_x, vsum, dD_part,
               length, NT, _bucket(NT), batch * groups, *x.stride(), *dout.stride(), *_strides4(z), *B.stride(),
               *C.stride())
    if ONE_BLOCK_BWD and NB == 1 and head_dim <= k["BV"]:
        ssd_dx_one_block_bwd_kernel[grid_group](*dx_args, HAS_D=D is not None, D_2D=D is not None and D.dim() == 2,
                                                **{key: v for key, v in common.items() if key != "BT"})  # BT = L
    else:
        ssd_dx_bwd_kernel[grid_group](*dx_args, HAS_D=D is not None, D_2D=D is not None and D.dim() == 2, **common)

    ddt = new_buffer(batch, length, heads, device=dev, dtype=dt.dtype)
    dA_part = new_buffer(batch, NT, heads, device=dev, dtype=f32)
    dbias_part = new_buffer(*dA_part.shape, device=dev, dtype=f32) if dt_bias is not None else dA_part
    BH = min(32, next_power_of_2(heads))
    ssd_ddt_bwd_kernel[(NT, batch, cdiv(heads, BH))](
        dt, A, dt_bias if dt_bias is not None else A, dtp, ddt_x, dsum, vsum, Kc_part, R_part, K_pair,
        T_pair, ddt, dA_part, dbias_part, length, NT, *dt.stride(), H=heads, L=L, BT=BT, BH=BH, KC_TILES=kc_tiles,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
    )

    def empty():  # absent gradients: distinct tensors (custom op outputs may not alias)
        return x.new_empty(0)

    dB = dB_out[0] if nsplit == 1 else dB_out.sum(0).to(B.dtype)
    dC = dC_out[0] if nsplit == 1 else dC_out.sum(0).to(C.dtype)
    dA = dA_part.sum((0, 1)).to(A.dtype)
    if D is not None:
        dD = dD_part.sum((0, 1, 2))
        dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    else:
        dD = empty()
    dbias = dbias_part.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else empty()
    dinit = dh0.to(initial_state.dtype) if initial_state is not None else empty()
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dinit


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mambatrain::ssd_scan_fwd", mutates_args=())
def _ssd_scan_fwd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    dt_bias: Optional[Tensor], dt_softplus: bool, initial_state: Optional[Tensor], doc: Optional[Tensor],
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return ssd_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, doc, chunk_size)


@_ssd_scan_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, doc, chunk_size):
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    nt = (length + chunk_size - 1) // chunk_size
    f32 = torch.float32
    out = x.new_empty(batch, length, heads, head_dim)
    return (
        out,
        x.new_empty(batch, heads, head_dim, d_state, dtype=f32),
        x.new_empty(batch, length, heads, head_dim) if z is not None else x.new_empty(0),
        x.new_empty(batch, heads, nt, head_dim, d_state, dtype=_state_dtype(x)),
        x.new_empty(batch, heads, length, dtype=f32),
        x.new_empty(2 if x.dtype == torch.float32 else 1, batch, heads, length, dtype=f32),
        x.new_empty(batch, groups, nt, chunk_size, chunk_size, dtype=_s_dtype(x)),
    )


@torch.library.custom_op("mambatrain::ssd_scan_bwd", mutates_args=())
def _ssd_scan_bwd(
    dout: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
    initial_state: Optional[Tensor], doc: Optional[Tensor], chunk_size: int,
    ypre: Tensor, states: Tensor, dtp: Tensor, dA_cs: Tensor, S: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return ssd_bwd(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, doc, chunk_size,
                   ypre, states, dtp, dA_cs, S)


@_ssd_scan_bwd.register_fake
def _(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, doc, chunk_size,
      ypre, states, dtp, dA_cs, S):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)
    return like(x), like(dt), like(A), like(B), like(C), like(D), like(z), like(dt_bias), like(initial_state)


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, doc, chunk_size = inputs
    out, final, ypre, states, dtp, dA_cs, S = output
    # the gate's input is needed for dz only
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, doc,
                          ypre if z is not None else None, states, dtp, dA_cs, S)
    ctx.dt_softplus, ctx.chunk_size = dt_softplus, chunk_size
    # Outputs without a gradient (the final state when unused, the internals saved for backward) arrive as
    # None instead of zero tensors the size of the chunk states (3 GB at 1M tokens).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dfinal, *_unused):
    x, dt, A, B, C, D, z, dt_bias, initial_state, doc, ypre, states, dtp, dA_cs, S = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    backward = ssd_bwd if getattr(ctx, "eager", False) else _ssd_scan_bwd
    grads = backward(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, ctx.dt_softplus, initial_state, doc,
                     ctx.chunk_size, ypre if z is not None else x, states, dtp, dA_cs, S)
    dx, ddt, dA, dB, dC, dD, dz, dbias, dinit = grads
    return (dx, ddt, dA, dB, dC,
            dD if D is not None else None,
            dz if z is not None else None,
            dbias if dt_bias is not None else None,
            None,
            dinit if initial_state is not None else None,
            None, None)


torch.library.register_autograd("mambatrain::ssd_scan_fwd", _backward, setup_context=_setup_context)


class _SSDScan(torch.autograd.Function):
    """The custom op's forward and backward without its dispatch, for eager calls (see EAGER_FUNCTION)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = ssd_fwd(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.eager = True
        return output[0], output[1]

    @staticmethod
    def backward(ctx, dout, dfinal):
        return _backward(ctx, dout, dfinal)


# ----------------------------------------------------------------------------- public function


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = 256,
):
    """Mamba-2 (SSD) scan, chunked, on Triton kernels; results as ``ssd_naive``.

    Per head (one scalar decay A per head, state h of (head_dim, d_state)):

        dt_t = softplus(dt_t + dt_bias)                         (if dt_softplus)
        h_t  = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  h_{t-1} = 0 where seq_idx changes at t
        y_t  = (h_t C_t + D x_t) * silu(z_t)

    Shapes: x, z (batch, length, heads, head_dim); dt (batch, length, heads);
    A, dt_bias (heads,); D (heads,) or (heads, head_dim); B, C (batch, length,
    groups, d_state), heads divisible by groups; initial_state (batch, heads,
    head_dim, d_state); seq_idx (batch, length) integer document ids.
    Returns y (batch, length, heads, head_dim) in x's dtype, and with
    ``return_final_state`` the fp32 final state (batch, heads, head_dim, d_state).
    ``chunk_size`` (64, 128 or 256) changes the order of the sums only.
    Inputs may be strided views; every input gets a gradient, and the final
    state passes one back. B, C and z are used in x's dtype.
    """
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError("ssd_scan runs on CUDA tensors (or under TRITON_INTERPRET=1); use ssd_chunked_torch on CPU")
    if B.dtype != x.dtype:
        B = B.to(x.dtype)
    if C.dtype != x.dtype:
        C = C.to(x.dtype)
    if z is not None and z.dtype != x.dtype:
        z = z.to(x.dtype)
    if seq_idx is not None and seq_idx.shape != x.shape[:2]:  # the kernels would read past its end
        raise ValueError(f"seq_idx must be (batch, length) = {tuple(x.shape[:2])}, got {tuple(seq_idx.shape)}")
    doc = document_ids(seq_idx) if seq_idx is not None else None
    inputs = (x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, doc, chunk_size)
    if EAGER_FUNCTION and not torch.compiler.is_compiling():
        out, final = _SSDScan.apply(*inputs)
    else:
        out, final = torch.ops.mambatrain.ssd_scan_fwd(*inputs)[:2]
    return (out, final) if return_final_state else out
