"""Causal depthwise convolution fused with SiLU in Triton, forward and backward.

Same signature and results as ``naive.causal_conv1d_silu_naive``; the maths
is in this folder's README.md. Tiles are [BT steps, BC channels] with the
channels contiguous in memory (x is channel-last), so every row of a tile is
one coalesced read. A tap reaching k steps back is a second load of the tile
shifted by k rows, which the cache serves: memory sees x about once.

Forward: one program per (time block, channel block, batch row) writes
silu(pre). Backward: one program per (time chunk, channel block, batch row)
walks its chunk in blocks of BT rows of the *input* xin (the prefix rows
included), computes dpre = dout silu'(pre) once per row (pre recomputed),
puts it in a per-program scratch and reads it back shifted by each tap, and
writes dx (or dprefix) for its rows; dweight and dbias leave one fp32 partial
sum per program, summed by torch: no atomics, bitwise deterministic. Nothing
is saved for the backward but the inputs.

Vocabulary as in flash-linear-attention: ``i_`` program ids, ``o_`` offsets,
``m_`` masks, ``p_`` pointers, ``b_`` block values. Row offsets are int64
(B * T * C passes 2^31 at 1M tokens x 3000 channels).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..settings import INTERPRET, autotune, cdiv, configs, new_buffer, next_power_of_2


_FWD_SPACE = [dict(BT=64, BC=128, num_warps=4), dict(BT=32, BC=256, num_warps=4), dict(BT=128, BC=128, num_warps=8)]
_BWD_SPACE = [dict(BT=32, BC=128, num_warps=4), dict(BT=16, BC=256, num_warps=4), dict(BT=64, BC=64, num_warps=4)]
FWD_CONFIGS = configs(_FWD_SPACE, dict(BT=64, BC=64), _FWD_SPACE[0])
BWD_CONFIGS = configs(_BWD_SPACE, dict(BT=32, BC=64), _BWD_SPACE[0])
# The backward's time chunks are a multiple of this many rows, hence of every BT.
CHUNK_ALIGN = 128
# Backward programs to aim for (a few per SM): fewer, longer chunks mean fewer dweight partial sums;
# more programs keep the SMs busy at batch 1.
BWD_PROGRAMS = 2048


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load_xin(x, prefix, i_b, o_s, o_c, m_c, T, s_xb, s_xt, s_pb, s_pt,
              W: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Rows o_s of xin, fp32 [BT, BC]: x for 0 <= s < T, the prefix for -(W-1) <= s < 0, else 0."""
    m_x = (o_s >= 0) & (o_s < T)
    p_x = x + i_b * s_xb + o_s[:, None] * s_xt + o_c[None, :]
    b_x = tl.load(p_x, mask=m_x[:, None] & m_c[None, :], other=0.).to(tl.float32)
    if HAS_PREFIX:
        m_p = (o_s < 0) & (o_s >= 1 - W)
        p_p = prefix + i_b * s_pb + (o_s + W - 1)[:, None] * s_pt + o_c[None, :]
        b_x += tl.load(p_p, mask=m_p[:, None] & m_c[None, :], other=0.).to(tl.float32)
    return b_x


@triton.jit
def _load_doc(seq_idx, i_b, o_s, T, s_sb, s_st, W: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Document ids of the rows o_s of xin [BT]; -1 where there is no row (its input is 0 anyway)."""
    o_q = o_s + W - 1 if HAS_PREFIX else o_s  # seq_idx covers the prefix too when there is one
    return tl.load(seq_idx + i_b * s_sb + o_q * s_st, mask=(o_q >= 0) & (o_s < T), other=-1)


@triton.jit
def _pre(x, weight, bias, seq_idx, prefix, i_b, o_t, o_c, m_c, T,
         s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_wc, s_ww,
         W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_PREFIX: tl.constexpr,
         BT: tl.constexpr, BC: tl.constexpr):
    """pre[t] = bias + sum_k weight[W-1-k] xin[t-k] [doc(t-k) == doc(t)] at the rows o_t, fp32 [BT, BC];
    and xin[t] (its tap k = 0), which the backward needs too."""
    b_pre = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        b_pre += tl.load(bias + o_c, mask=m_c, other=0.).to(tl.float32)[None, :]
    if HAS_SEQ:
        b_doc = _load_doc(seq_idx, i_b, o_t, T, s_sb, s_st, W, HAS_PREFIX)
    b_x0 = _load_xin(x, prefix, i_b, o_t, o_c, m_c, T, s_xb, s_xt, s_pb, s_pt, W, HAS_PREFIX)
    for k in tl.static_range(W):
        if k == 0:
            b_x = b_x0
        else:
            b_x = _load_xin(x, prefix, i_b, o_t - k, o_c, m_c, T, s_xb, s_xt, s_pb, s_pt, W, HAS_PREFIX)
            if HAS_SEQ:
                b_dk = _load_doc(seq_idx, i_b, o_t - k, T, s_sb, s_st, W, HAS_PREFIX)
                b_x = tl.where((b_dk == b_doc)[:, None], b_x, 0.)
        b_w = tl.load(weight + o_c * s_wc + (W - 1 - k) * s_ww, mask=m_c, other=0.).to(tl.float32)  # [BC]
        b_pre += b_w[None, :] * b_x
    return b_pre, b_x0


@triton.jit
def _dpre(x, weight, bias, seq_idx, prefix, dout, i_b, o_t, o_c, m_c, T,
          s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_wc, s_ww, s_db, s_dt,
          W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_PREFIX: tl.constexpr,
          BT: tl.constexpr, BC: tl.constexpr):
    """dpre[t] = dout[t] silu'(pre[t]) at the rows o_t, fp32 [BT, BC], 0 outside [0, T); and xin[t]."""
    b_pre, b_x0 = _pre(x, weight, bias, seq_idx, prefix, i_b, o_t, o_c, m_c, T,
                       s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_wc, s_ww,
                       W, HAS_BIAS, HAS_SEQ, HAS_PREFIX, BT, BC)
    m_t = (o_t >= 0) & (o_t < T)
    p_do = dout + i_b * s_db + o_t[:, None] * s_dt + o_c[None, :]
    b_do = tl.load(p_do, mask=m_t[:, None] & m_c[None, :], other=0.).to(tl.float32)
    b_sig = 1. / (1. + tl.exp(-b_pre))
    return b_do * b_sig * (1. + b_pre * (1. - b_sig)), b_x0


@autotune(configs=FWD_CONFIGS, key=["C", "W", "HAS_BIAS", "HAS_SEQ", "HAS_PREFIX"])
@triton.jit
def conv1d_silu_fwd_kernel(
    x, weight, bias, seq_idx, prefix, out,
    T, C,
    s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_wc, s_ww,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_PREFIX: tl.constexpr,
    ALIGN: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    """out[b, t, c] = silu(pre[b, t, c]); one program per (time block, channel block, batch row)."""
    s_xb, s_xt, s_pb, s_pt = s_xb * ALIGN, s_xt * ALIGN, s_pb * ALIGN, s_pt * ALIGN  # see _align
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64 = i_b.to(tl.int64)
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)  # [BT]
    o_c = i_c * BC + tl.arange(0, BC)  # [BC]
    m_c = o_c < C
    b_pre, _ = _pre(x, weight, bias, seq_idx, prefix, i_b64, o_t, o_c, m_c, T,
                    s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_wc, s_ww,
                    W, HAS_BIAS, HAS_SEQ, HAS_PREFIX, BT, BC)  # [BT, BC]
    b_out = b_pre / (1. + tl.exp(-b_pre))
    p_o = out + i_b64 * T * C + o_t[:, None] * C + o_c[None, :]
    tl.store(p_o, b_out.to(out.dtype.element_ty), mask=(o_t < T)[:, None] & m_c[None, :])


@autotune(configs=BWD_CONFIGS, key=["C", "W", "HAS_BIAS", "HAS_SEQ", "HAS_PREFIX"])
@triton.jit
def conv1d_silu_bwd_kernel(
    x, weight, bias, seq_idx, prefix, dout, dx, dprefix, dw_part, db_part, scratch,
    T, C, CHUNK, NCH, RS,
    s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_wc, s_ww, s_db, s_dt,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_PREFIX: tl.constexpr,
    ALIGN: tl.constexpr, WP: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    """One program per (chunk of CHUNK input rows, channel block, batch row).

    Input rows s run from -(W-1) (with a prefix) to T-1. Row s feeds the
    outputs t = s + k, k < W, through tap W-1-k: dxin[s] = sum_k weight[W-1-k]
    g_k[s] with g_k[s] = dpre[s+k] [doc(s) == doc(s+k)], and dweight[W-1-k]
    gets sum_s xin[s] g_k[s] (each row s is owned by one program, so each
    product is counted once). dpre = dout silu'(pre), pre recomputed once per
    row: for a block of BT rows s0.. the program computes dpre at those rows
    and at the HP >= W-1 rows after them (the halo), writes both to its
    scratch (RS >= BT + HP rows) and reads them back shifted by k rows.
    """
    P: tl.constexpr = W - 1 if HAS_PREFIX else 0  # prefix rows
    s_xb, s_xt, s_pb, s_pt = s_xb * ALIGN, s_xt * ALIGN, s_pb * ALIGN, s_pt * ALIGN  # see _align
    s_db, s_dt = s_db * ALIGN, s_dt * ALIGN
    i_ch, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64 = i_b.to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)  # [BC]
    m_c = o_c < C
    o_w = tl.arange(0, WP)
    o_r, o_h = tl.arange(0, BT), tl.arange(0, HP)  # rows of a block, of its halo
    o_part = i_b64 * NCH + i_ch  # (batch, chunk) slot of the partial sums and the scratch
    p_scr = scratch + o_part * RS * C + o_c[None, :]  # + row * C: this program's [RS, BC] of the scratch
    b_dw = tl.zeros([WP, BC], dtype=tl.float32)  # row i: the partial sum of dweight[:, i]
    b_db = tl.zeros([BC], dtype=tl.float32)
    start = i_ch.to(tl.int64) * CHUNK  # first row of the chunk, counted from the prefix's first
    n_blk = tl.cdiv(tl.minimum(CHUNK, T + P - start), BT)
    for i_blk in range(0, n_blk):
        s0 = start + i_blk * BT - P  # first row of the block in xin
        o_s = s0 + o_r  # [BT]
        b_g, b_x0 = _dpre(x, weight, bias, seq_idx, prefix, dout, i_b64, o_s, o_c, m_c, T,
                          s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_wc, s_ww, s_db, s_dt,
                          W, HAS_BIAS, HAS_SEQ, HAS_PREFIX, BT, BC)  # dpre[s], xin[s]: [BT, BC]
        b_gh, _ = _dpre(x, weight, bias, seq_idx, prefix, dout, i_b64, s0 + BT + o_h, o_c, m_c, T,
                        s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_wc, s_ww, s_db, s_dt,
                        W, HAS_BIAS, HAS_SEQ, HAS_PREFIX, HP, BC)  # dpre of the halo: [HP, BC]
        # the previous block's shifted reads are done before the scratch is overwritten
        tl.debug_barrier()
        tl.store(p_scr + o_r[:, None] * C, b_g, mask=m_c[None, :])
        tl.store(p_scr + (BT + o_h)[:, None] * C, b_gh, mask=m_c[None, :])
        # a row of the scratch is written by some threads and read back shifted by others
        tl.debug_barrier()
        b_db += tl.sum(b_g, axis=0)
        if HAS_SEQ:
            b_doc = _load_doc(seq_idx, i_b64, o_s, T, s_sb, s_st, W, HAS_PREFIX)
        b_dx = tl.zeros([BT, BC], dtype=tl.float32)
        for k in tl.static_range(W):  # the output s + k reads row s through tap W-1-k
            if k == 0:
                b_gk = b_g  # (its document is its own)
            else:
                b_gk = tl.load(p_scr + (o_r + k)[:, None] * C, mask=m_c[None, :], other=0.)  # dpre[s+k]
                if HAS_SEQ:
                    b_dk = _load_doc(seq_idx, i_b64, o_s + k, T, s_sb, s_st, W, HAS_PREFIX)
                    b_gk = tl.where((b_dk == b_doc)[:, None], b_gk, 0.)
            b_w = tl.load(weight + o_c * s_wc + (W - 1 - k) * s_ww, mask=m_c, other=0.).to(tl.float32)
            b_dx += b_w[None, :] * b_gk
            b_dw += tl.where((o_w == W - 1 - k)[:, None], tl.sum(b_x0 * b_gk, axis=0)[None, :], 0.)
        p_dx = dx + i_b64 * T * C + o_s[:, None] * C + o_c[None, :]
        tl.store(p_dx, b_dx.to(dx.dtype.element_ty), mask=((o_s >= 0) & (o_s < T))[:, None] & m_c[None, :])
        if HAS_PREFIX:
            p_dp = dprefix + i_b64 * P * C + (o_s + P)[:, None] * C + o_c[None, :]
            tl.store(p_dp, b_dx.to(dprefix.dtype.element_ty), mask=(o_s < 0)[:, None] & m_c[None, :])
    p_dw = dw_part + (o_part * W + o_w[:, None]) * C + o_c[None, :]
    tl.store(p_dw, b_dw, mask=(o_w < W)[:, None] & m_c[None, :])
    if HAS_BIAS:
        tl.store(db_part + o_part * C + o_c, b_db, mask=m_c)


# Backward by a walk over time (conv1d_silu_bwd_walk_kernel, widths up to WALK_MAX_WIDTH) instead of blocks through
# a scratch (conv1d_silu_bwd_kernel, any width). On an H100 at the 130M Mamba-2's shape the walk's forward+backward
# GPU time is 0.17 against 0.39 ms at 16k, 2.3 against 5.6 ms at 256k (benchmarks/bench_conv1d_walk_h100.json).
# MAMBATRAIN_CONV1D_WALK_BWD=0 takes the block kernel.
WALK_BWD = os.environ.get("MAMBATRAIN_CONV1D_WALK_BWD", "1") == "1"
WALK_MAX_WIDTH = 4  # the walk keeps W - 1 rows of each window in named registers
_WALK_SPACE = [dict(BC=128, num_warps=1), dict(BC=256, num_warps=2), dict(BC=64, num_warps=1)]
WALK_CONFIGS = configs(_WALK_SPACE, dict(BC=64, num_warps=1), _WALK_SPACE[0])
# Programs the walk aims for, one or two warps each (2048 beat 8192 and 32768 at 16k and 256k on an H100: fewer,
# longer walks). Its chunks need no alignment beyond WALK_ALIGN rows.
WALK_PROGRAMS = 2048
WALK_ALIGN = 16


@triton.jit
def _row_x(x, prefix, i_b, s, o_c, m_c, T, s_xb, s_xt, s_pb, s_pt, W: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Row s of xin, fp32 [BC]: x for 0 <= s < T, the prefix for -(W-1) <= s < 0, else 0."""
    b_x = tl.load(x + i_b * s_xb + s * s_xt + o_c, mask=m_c & (s >= 0) & (s < T), other=0.).to(tl.float32)
    if HAS_PREFIX:
        b_x += tl.load(prefix + i_b * s_pb + (s + W - 1) * s_pt + o_c, mask=m_c & (s < 0) & (s >= 1 - W),
                       other=0.).to(tl.float32)
    return b_x


@triton.jit
def _row_doc(seq_idx, i_b, s, T, s_sb, s_st, W: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Document id of row s of xin; -1 where there is no row (its input is 0 anyway)."""
    q = s + W - 1 if HAS_PREFIX else s
    return tl.load(seq_idx + i_b * s_sb + q * s_st, mask=(q >= 0) & (s < T), other=-1)


@triton.jit
def _tap(b_v, d_v, d_ref, HAS_SEQ: tl.constexpr):
    """b_v where its row's document is d_ref's (always without documents)."""
    if HAS_SEQ:
        b_v = tl.where(d_v == d_ref, b_v, 0.)
    return b_v


@triton.jit
def _walk_step(x, prefix, seq_idx, dout, dx, dprefix, i_b, t, S0, S1, o_c, m_c, T, C,
               s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_db, s_dt,
               w0, w1, w2, w3, b_bias, x0, b_do, x1, x2, x3, d1, d2, d3, g1, g2, g3, dw0, dw1, dw2, dw3, b_db,
               W: tl.constexpr, P: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_PREFIX: tl.constexpr,
               EDGE: tl.constexpr):
    """One step t of the walk; returns the windows and sums moved on by one row.

    EDGE: t may lie outside [0, T) or near the program's row range, so the step loads its own rows and masks
    its sums; the steps in between (S0 + W - 1 <= t < S1) own every pair and take x0 = x[t], b_do = dout[t]
    loaded by the step before (fp32).
    """
    if EDGE:
        x0 = _row_x(x, prefix, i_b, t, o_c, m_c, T, s_xb, s_xt, s_pb, s_pt, W, HAS_PREFIX)
        b_do = tl.load(dout + i_b * s_db + t * s_dt + o_c, mask=m_c & (t >= 0) & (t < T), other=0.).to(tl.float32)
    d0 = -1
    if HAS_SEQ:
        d0 = _row_doc(seq_idx, i_b, t, T, s_sb, s_st, W, HAS_PREFIX)
    # pre[t] and the document-cut taps (the same cut applies to the dweight pairs)
    y1, y2, y3 = x1, x2, x3
    if HAS_SEQ:
        y1, y2, y3 = _tap(x1, d1, d0, HAS_SEQ), _tap(x2, d2, d0, HAS_SEQ), _tap(x3, d3, d0, HAS_SEQ)
    pre = b_bias + w0 * x0
    if W > 1:
        pre += w1 * y1
    if W > 2:
        pre += w2 * y2
    if W > 3:
        pre += w3 * y3
    # silu'(pre) with a fast reciprocal: the IEEE division is ~10 instructions
    b_sig = tl.fdiv(1., 1. + tl.exp(-pre), ieee_rounding=False)
    g0 = b_do * b_sig * (1. + pre * (1. - b_sig))  # 0 where t has no output
    if EDGE:
        b_db += tl.where(t < S1, g0, 0.)
        dw0 += tl.where(t < S1, x0 * g0, 0.)
        if W > 1:
            dw1 += tl.where((t - 1 >= S0) & (t - 1 < S1), y1 * g0, 0.)
        if W > 2:
            dw2 += tl.where((t - 2 >= S0) & (t - 2 < S1), y2 * g0, 0.)
        if W > 3:
            dw3 += tl.where((t - 3 >= S0) & (t - 3 < S1), y3 * g0, 0.)
    else:
        b_db += g0
        dw0 += x0 * g0
        dw1 += y1 * g0
        dw2 += y2 * g0
        dw3 += y3 * g0
    # row s = t-W+1: every dpre it feeds is known now
    s = t - (W - 1)
    if W == 1:
        b_dx = w0 * g0
    elif W == 2:
        b_dx = w0 * g1 + w1 * _tap(g0, d0, d1, HAS_SEQ)
    elif W == 3:
        b_dx = w0 * g2 + w1 * _tap(g1, d1, d2, HAS_SEQ) + w2 * _tap(g0, d0, d2, HAS_SEQ)
    else:
        b_dx = w0 * g3 + w1 * _tap(g2, d2, d3, HAS_SEQ) + w2 * _tap(g1, d1, d3, HAS_SEQ) \
            + w3 * _tap(g0, d0, d3, HAS_SEQ)
    m_s = m_c & (s >= S0) & (s < S1) if EDGE else m_c
    tl.store(dx + i_b * T * C + s * C + o_c, b_dx.to(dx.dtype.element_ty), mask=m_s & (s >= 0))
    if HAS_PREFIX:
        tl.store(dprefix + i_b * P * C + (s + P) * C + o_c, b_dx.to(dprefix.dtype.element_ty), mask=m_s & (s < 0))
    return x0, x1, x2, d0, d1, d2, g0, g1, g2, dw0, dw1, dw2, dw3, b_db


@autotune(configs=WALK_CONFIGS, key=["C", "W", "HAS_BIAS", "HAS_SEQ", "HAS_PREFIX"])
@triton.jit
def conv1d_silu_bwd_walk_kernel(
    x, weight, bias, seq_idx, prefix, dout, dx, dprefix, dw_part, db_part,
    T, C, CHUNK, NCH,
    s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_wc, s_ww, s_db, s_dt,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_PREFIX: tl.constexpr,
    ALIGN: tl.constexpr, BC: tl.constexpr,
):
    """``conv1d_silu_bwd_kernel``'s results (W <= 4), one program per (chunk of CHUNK input rows, channel block,
    batch row), walking time one row at a time: the last W-1 rows of xin, of dpre and of their documents stay
    in registers, so each row of x and dout is loaded once and no scratch or barrier is needed.

    At step t: pre[t] from xin[t-W+1..t], dpre[t] = dout[t] silu'(pre[t]); the pairs (s, t), s = t-k, that the
    program owns (S0 <= s < S1) add xin[s] dpre[t] to dweight[W-1-k]; row s = t-W+1 has all its dpre[s..t]
    and gets dxin[s] = sum_k weight[W-1-k] dpre[s+k]. The walk runs W-1 steps past its rows for that; its
    first and last W-1 steps are the masked kind (``_walk_step``'s EDGE).
    """
    P: tl.constexpr = W - 1 if HAS_PREFIX else 0  # prefix rows
    s_xb, s_xt, s_pb, s_pt = s_xb * ALIGN, s_xt * ALIGN, s_pb * ALIGN, s_pt * ALIGN  # see _align
    s_db, s_dt = s_db * ALIGN, s_dt * ALIGN
    i_ch, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64 = i_b.to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_part = i_b64 * NCH + i_ch
    zero = tl.zeros([BC], dtype=tl.float32)
    # w_k: the weight of xin[t-k] in pre[t] (weight[:, W-1-k])
    w0 = tl.load(weight + o_c * s_wc + (W - 1) * s_ww, mask=m_c, other=0.).to(tl.float32)
    w1, w2, w3 = zero, zero, zero
    if W > 1:
        w1 = tl.load(weight + o_c * s_wc + (W - 2) * s_ww, mask=m_c, other=0.).to(tl.float32)
    if W > 2:
        w2 = tl.load(weight + o_c * s_wc + (W - 3) * s_ww, mask=m_c, other=0.).to(tl.float32)
    if W > 3:
        w3 = tl.load(weight + o_c * s_wc + (W - 4) * s_ww, mask=m_c, other=0.).to(tl.float32)
    b_bias = zero
    if HAS_BIAS:
        b_bias = tl.load(bias + o_c, mask=m_c, other=0.).to(tl.float32)
    S0 = i_ch.to(tl.int64) * CHUNK - P  # the program's rows of xin: S0 <= s < S1
    S1 = tl.minimum(S0 + CHUNK, T)
    # the windows: xin, documents and dpre of rows t-1, t-2, t-3 (dpre before S0 only reaches rows before S0)
    x1, x2, x3 = zero, zero, zero
    d1, d2, d3 = -1, -1, -1
    if W > 1:
        x1 = _row_x(x, prefix, i_b64, S0 - 1, o_c, m_c, T, s_xb, s_xt, s_pb, s_pt, W, HAS_PREFIX)
    if W > 2:
        x2 = _row_x(x, prefix, i_b64, S0 - 2, o_c, m_c, T, s_xb, s_xt, s_pb, s_pt, W, HAS_PREFIX)
    if W > 3:
        x3 = _row_x(x, prefix, i_b64, S0 - 3, o_c, m_c, T, s_xb, s_xt, s_pb, s_pt, W, HAS_PREFIX)
    if HAS_SEQ:
        d1 = _row_doc(seq_idx, i_b64, S0 - 1, T, s_sb, s_st, W, HAS_PREFIX)
        d2 = _row_doc(seq_idx, i_b64, S0 - 2, T, s_sb, s_st, W, HAS_PREFIX)
        d3 = _row_doc(seq_idx, i_b64, S0 - 3, T, s_sb, s_st, W, HAS_PREFIX)
    g1, g2, g3 = zero, zero, zero
    dw0, dw1, dw2, dw3, b_db = zero, zero, zero, zero, zero
    # steps S0 <= t < S0 + W - 1 (rows before S0 in the window), then the inner steps, then S1 <= t < S1 + W - 1
    inner = tl.minimum(S0 + W - 1, S1)
    for t in range(S0, inner):
        x1, x2, x3, d1, d2, d3, g1, g2, g3, dw0, dw1, dw2, dw3, b_db = _walk_step(
            x, prefix, seq_idx, dout, dx, dprefix, i_b64, t, S0, S1, o_c, m_c, T, C,
            s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_db, s_dt,
            w0, w1, w2, w3, b_bias, zero, zero, x1, x2, x3, d1, d2, d3, g1, g2, g3, dw0, dw1, dw2, dw3, b_db,
            W, P, HAS_SEQ, HAS_PREFIX, True)
    # each inner step loads the next one's rows before it computes: two rows in flight per program
    p_xt = x + i_b64 * s_xb + o_c
    p_dot = dout + i_b64 * s_db + o_c
    x_next = tl.load(p_xt + inner * s_xt, mask=m_c & (inner < S1), other=0.).to(tl.float32)
    do_next = tl.load(p_dot + inner * s_dt, mask=m_c & (inner < S1), other=0.).to(tl.float32)
    for t in range(inner, S1):
        x0, b_do = x_next, do_next
        x_next = tl.load(p_xt + (t + 1) * s_xt, mask=m_c & (t + 1 < S1), other=0.).to(tl.float32)
        do_next = tl.load(p_dot + (t + 1) * s_dt, mask=m_c & (t + 1 < S1), other=0.).to(tl.float32)
        x1, x2, x3, d1, d2, d3, g1, g2, g3, dw0, dw1, dw2, dw3, b_db = _walk_step(
            x, prefix, seq_idx, dout, dx, dprefix, i_b64, t, S0, S1, o_c, m_c, T, C,
            s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_db, s_dt,
            w0, w1, w2, w3, b_bias, x0, b_do, x1, x2, x3, d1, d2, d3, g1, g2, g3, dw0, dw1, dw2, dw3, b_db,
            W, P, HAS_SEQ, HAS_PREFIX, False)
    for t in range(tl.maximum(S1, inner), S1 + W - 1):
        x1, x2, x3, d1, d2, d3, g1, g2, g3, dw0, dw1, dw2, dw3, b_db = _walk_step(
            x, prefix, seq_idx, dout, dx, dprefix, i_b64, t, S0, S1, o_c, m_c, T, C,
            s_xb, s_xt, s_pb, s_pt, s_sb, s_st, s_db, s_dt,
            w0, w1, w2, w3, b_bias, zero, zero, x1, x2, x3, d1, d2, d3, g1, g2, g3, dw0, dw1, dw2, dw3, b_db,
            W, P, HAS_SEQ, HAS_PREFIX, True)
    p_dw = dw_part + (o_part * W + (W - 1)) * C + o_c  # dweight[:, W-1-k] gets dw_k
    tl.store(p_dw, dw0, mask=m_c)
    if W > 1:
        tl.store(p_dw - C, dw1, mask=m_c)
    if W > 2:
        tl.store(p_dw - 2 * C, dw2, mask=m_c)
    if W > 3:
        tl.store(p_dw - 3 * C, dw3, mask=m_c)
    if HAS_BIAS:
        tl.store(db_part + o_part * C + o_c, b_db, mask=m_c)


# ----------------------------------------------------------------------------- launchers


def _rows(t: Tensor | None) -> Tensor | None:
    # kernels index the last dim with stride 1 (bias: its only dim) and take the other strides as given
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _strides(t: Tensor | None) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _chunks(rows: int, batch: int, channels: int, programs: int, align: int) -> tuple[int, int]:
    """(rows per chunk, chunks) of the backward: about ``programs`` programs, chunks a multiple of ``align``."""
    per_row = max(1, programs // (batch * cdiv(channels, 128)))
    chunk = cdiv(cdiv(rows, per_row), align) * align
    return chunk, cdiv(rows, chunk)


def _halo(width: int) -> int:
    """Rows of dpre the backward computes past each block, a power of two: the block's last row reads W-1 more."""
    return next_power_of_2(max(width - 1, 1))


def _align(*strides: int) -> int:
    """Largest power of two up to 16 dividing every stride. The kernels take the strides divided by it and
    multiply back by a constant, so Triton knows each row starts aligned and vectorizes the loads: it only
    infers that for strides divisible by 16, which a slice of a projection (3352 = 8 x 419 wide in the
    130M Mamba-2) is not."""
    a = 16
    while a > 1 and any(s % a for s in strides):
        a //= 2
    return a


def _flags(bias, seq_idx, prefix, width) -> dict:
    return dict(W=width, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, HAS_PREFIX=prefix is not None)


def conv1d_silu_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None,
                    prefix: Tensor | None) -> Tensor:
    x, prefix, seq_idx, bias = _rows(x), _rows(prefix), _rows(seq_idx), _rows(bias)
    batch, length, channels = x.shape
    out = new_buffer(batch, length, channels, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out

    def grid(meta):
        return cdiv(length, meta["BT"]), cdiv(channels, meta["BC"]), batch

    s_x = (*x.stride()[:2], *_strides(prefix))
    align = _align(*s_x)
    conv1d_silu_fwd_kernel[grid](
        x, weight, bias, seq_idx, prefix, out, length, channels,
        *(s // align for s in s_x), *_strides(seq_idx), *weight.stride(),
        ALIGN=align, **_flags(bias, seq_idx, prefix, weight.shape[1]),
    )
    return out


def conv1d_silu_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None,
                    prefix: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, prefix, seq_idx, dout, bias = _rows(x), _rows(prefix), _rows(seq_idx), _rows(dout), _rows(bias)
    batch, length, channels = x.shape
    width = weight.shape[1]
    dev = x.device
    rows = length + (width - 1 if prefix is not None else 0)  # of xin, prefix included
    walk = WALK_BWD and width <= WALK_MAX_WIDTH
    if walk:
        chunk, nch = _chunks(rows, batch, channels, WALK_PROGRAMS, WALK_ALIGN)
    else:
        assert all(CHUNK_ALIGN % c.kwargs["BT"] == 0 for c in BWD_CONFIGS), "CHUNK_ALIGN must be a multiple of every BT"
        chunk, nch = _chunks(rows, batch, channels, BWD_PROGRAMS, CHUNK_ALIGN)
    dx = new_buffer(batch, length, channels, device=dev, dtype=x.dtype)
    dprefix = new_buffer(*prefix.shape, device=dev, dtype=prefix.dtype) if prefix is not None else x.new_empty(0)
    dw_part = new_buffer(batch, nch, width, channels, device=dev)
    db_part = new_buffer(batch, nch, channels, device=dev) if bias is not None else dw_part
    if batch * rows * channels > 0:
        def grid(meta):
            return nch, cdiv(channels, meta["BC"]), batch

        s_x, s_do = (*x.stride()[:2], *_strides(prefix)), dout.stride()[:2]
        align = _align(*s_x, *s_do)
        strides = (*(s // align for s in s_x), *_strides(seq_idx), *weight.stride(), *(s // align for s in s_do))
        if walk:
            conv1d_silu_bwd_walk_kernel[grid](
                x, weight, bias, seq_idx, prefix, dout, dx, dprefix, dw_part, db_part, length, channels, chunk, nch,
                *strides, ALIGN=align, **_flags(bias, seq_idx, prefix, width),
            )
        else:
            halo = _halo(width)
            scratch_rows = max(c.kwargs["BT"] for c in BWD_CONFIGS) + halo  # whichever config autotuning picks
            scratch = new_buffer(batch * nch, scratch_rows, channels, device=dev)  # one [rows, C] slot per chunk
            conv1d_silu_bwd_kernel[grid](
                x, weight, bias, seq_idx, prefix, dout, dx, dprefix, dw_part, db_part, scratch,
                length, channels, chunk, nch, scratch_rows, *strides,
                ALIGN=align, WP=next_power_of_2(width), HP=halo, **_flags(bias, seq_idx, prefix, width),
            )
    # deterministic reductions of the per-program partial sums
    # .to() returns a same-dtype tensor as it is, strides too: copy the transpose, as the fake promises
    dweight = dw_part.sum((0, 1)).t().contiguous().to(weight.dtype)  # (C, W)
    dbias = db_part.sum((0, 1)).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dweight, dbias, dprefix


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mambatrain::conv1d_silu_fwd", mutates_args=())
def _conv1d_silu_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
                     prefix: Optional[Tensor]) -> Tensor:
    return conv1d_silu_fwd(x, weight, bias, seq_idx, prefix)


@_conv1d_silu_fwd.register_fake
def _(x, weight, bias, seq_idx, prefix):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("mambatrain::conv1d_silu_bwd", mutates_args=())
def _conv1d_silu_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
                     prefix: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return conv1d_silu_bwd(dout, x, weight, bias, seq_idx, prefix)


@_conv1d_silu_bwd.register_fake
def _(dout, x, weight, bias, seq_idx, prefix):
    def like(t):  # absent inputs get empty gradients: a custom op returns tensors only
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)
    return like(x), like(weight), like(bias), like(prefix)


def _setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, prefix = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, prefix)  # the inputs only: pre is recomputed


def _backward(ctx, dout):
    x, weight, bias, seq_idx, prefix = ctx.saved_tensors
    dx, dweight, dbias, dprefix = _conv1d_silu_bwd(dout, x, weight, bias, seq_idx, prefix)
    return (dx, dweight, dbias if bias is not None else None, None, dprefix if prefix is not None else None)


_conv1d_silu_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def causal_conv1d_silu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    prefix: Tensor | None = None,
) -> Tensor:
    """silu of the causal depthwise convolution of x over time (Triton); results as ``causal_conv1d_silu_naive``.

        pre[t] = bias + sum_{k<W} weight[:, W-1-k] * xin[t-k] * [doc(t-k) == doc(t)]
        out[t] = silu(pre[t])

    Shapes: x (B, T, C), channels contiguous (a slice of a wider projection is
    fine); weight (C, W); bias (C,); prefix (B, W-1, C): xin[-(W-1):0], the
    inputs before x (zeros without it), used in x's dtype; seq_idx (B, T)
    integer document ids, or (B, W-1+T) with a prefix (the prefix's ids first).
    Computed in fp32; returns (B, T, C) in x's dtype. Differentiable in x,
    weight, bias and prefix; deterministic.
    """
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError("causal_conv1d_silu runs on CUDA tensors (or under TRITON_INTERPRET=1); "
                           "use causal_conv1d_silu_naive on CPU")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"causal_conv1d_silu takes fp32, bf16 or fp16 x, got {x.dtype}")
    batch, length, channels = x.shape
    width = weight.shape[-1]
    if weight.shape != (channels, width):
        raise ValueError(f"weight must be (channels, width) = ({channels}, W), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias must be ({channels},), got {tuple(bias.shape)}")
    if prefix is not None:
        if prefix.shape != (batch, width - 1, channels):
            raise ValueError(f"prefix must be (batch, width - 1, channels) = {(batch, width - 1, channels)}, "
                             f"got {tuple(prefix.shape)}")
        if prefix.dtype != x.dtype:
            prefix = prefix.to(x.dtype)
    if seq_idx is not None:
        rows = length + (width - 1 if prefix is not None else 0)
        if seq_idx.shape != (batch, rows):
            raise ValueError(f"seq_idx must be (batch, {'width - 1 + ' if prefix is not None else ''}length) = "
                             f"{(batch, rows)}, got {tuple(seq_idx.shape)}")
    return torch.ops.mambatrain.conv1d_silu_fwd(x, weight, bias, seq_idx, prefix)
