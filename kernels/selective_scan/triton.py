"""Mamba-1 selective scan in Triton, forward and backward.

Same signature and behaviour as ``naive.selective_scan_naive``; the maths is
in this folder's README.md. Time is cut into segments of
``CHECKPOINT_STEPS`` steps, and both directions run the segments in
parallel (at batch 1 the channel blocks alone leave most of the GPU idle).
A program owns one batch row, a block of BD channels and one segment, and
walks it in tiles of BT steps: inside a tile the recurrence is a parallel
``tl.associative_scan`` over a [NI, BT, BD, NL] tile (d_state = NI * NL),
across tiles the fp32 state is carried in registers. Forward: pass 1 finds
each segment's end state from zero and its decay product, pass 2 chains them
into the true start states (kept for the backward), pass 3 recomputes each
segment from its start state and writes y. Backward: pass A finds each
segment's adjoint for a zero carry and its decay product, pass B chains them
into the true carries, pass C recomputes each segment's states and runs the
adjoint recurrence as a reverse scan, producing the gradients.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from ..settings import AUTOTUNE, INTERPRET, autotune, cdiv, new_buffer, next_power_of_2

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Time steps between two saved states (segments). The forward stores
# batch * channels * d_state fp32 values per segment (1M steps, 1536 x 16:
# 200 MB per batch row; the backward makes three more such buffers). Each
# backward program keeps, per segment, the states at its tiles' starts
# (CHECKPOINT_STEPS / BT x BD x d_state) and the running dB, dC of the segment
# (2 x CHECKPOINT_STEPS x d_state), 128 KB at BT 8, BD 16, d_state 16 (192 KB
# at BT 4), which should stay in L2 for all programs together. A multiple of
# every BT below.
CHECKPOINT_STEPS = 512

# MUFU approximations through inline asm on the GPU (none in the interpreter);
# MAMBATRAIN_FAST_MATH=0 switches to tl.exp2 & co. to rule them out.
FAST_MATH = tl.constexpr(not INTERPRET and os.environ.get("MAMBATRAIN_FAST_MATH", "1") == "1")


# --------------------------------------------------------------------------
# combine operators
# --------------------------------------------------------------------------
@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # h -> a*h + b, first (a1, b1) then (a2, b2)
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _adjoint_combine(f1, q1, v1, f2, q2, v2):
    # Adjoint recurrence g_t = beta_t + abar_{t+1} g_{t+1}, scanned on the
    # time-flipped tile, so (f1, q1, v1) is the later segment. The decay that
    # carries g_{t+1} back belongs to the *next* step, so a segment is
    # (f: decay of its earliest step, q: product of its other decays,
    # v: g at its earliest step for a zero carry). Where the scan runs inside
    # a thread, q is dead code and this is one FMA per element.
    return f2, q2 * f1 * q1, v2 + q2 * f1 * v1


# --------------------------------------------------------------------------
# autotune configs
# --------------------------------------------------------------------------
def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides n, at most cap."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _fits(cfg, bn: int, gsize: int, bd: int, forward: bool) -> bool:
    """A config is legal and sane for d_state padded to bn and this group size.

    BD must divide the channels of one group (a program reads one group's B
    and C). BD * NL must give every thread its own (channel, state lane):
    fewer would put time across threads; the forward takes exactly one per
    thread (fewer configs to compile). The elements of one [NI, BT, BD, NL]
    tile that each thread holds are capped (registers).
    """
    ni, bt, nw = cfg.kwargs["NI"], cfg.kwargs["BT"], cfg.num_warps
    if ni > bn or gsize % bd:
        return False
    if INTERPRET:  # no threads, no registers
        return True
    threads_needed = bd * (bn // ni)
    if forward and threads_needed != 32 * nw:
        return False
    per_thread = _PER_THREAD_FWD if forward else _PER_THREAD_BWD
    elems = bt * bd * bn // (32 * nw)
    # the backward below 16 elements a thread: 60-160 instructions per element (per-tile overheads)
    return threads_needed >= 32 * nw and elems <= per_thread and (forward or elems >= 16)


def _prune(configs, named_args, **kwargs):
    bn, gsize = kwargs["BN"], named_args["GSIZE"]
    forward = "BD" not in kwargs  # the backward's BD is the host's
    return [c for c in configs if _fits(c, bn, gsize, c.kwargs.get("BD", kwargs.get("BD")), forward)]


# Elements of one tile per thread. sm_90, Triton 3.7, d_state 16: the forward
# fits 128 in 255 registers without spills, the backward (about four times as
# many live tiles) spills above 32.
_PER_THREAD_FWD, _PER_THREAD_BWD = 128, 32
# Pass C takes about 100 registers besides its tiles (addresses, carries,
# invariants) and ptxas then uses all 255 at every config: 8 warps per SM,
# too few to hide its shuffle, barrier and load latencies. Capped copies of
# its best configs trade spills (to L1) for 12 or 16 warps per SM; which wins
# is the autotuner's call (scripts/sass_report.py shows both sides offline).
_BWD_REG_CAPS = (168, 128)
if INTERPRET:  # autotuning in the interpreter costs minutes: one config (tests swap it)
    _FWD_CONFIGS = [triton.Config({"BT": 32, "BD": 8, "NI": 2}, num_warps=1)]
    _BWD_CONFIGS = [triton.Config({"BT": 32, "NI": 2}, num_warps=1)]
elif not AUTOTUNE:
    _FWD_CONFIGS = [triton.Config({"BT": 32, "BD": 8, "NI": 4}, num_warps=1, num_stages=1)]
    _BWD_CONFIGS = [triton.Config({"BT": 4, "NI": 4}, num_warps=1, num_stages=1)]
else:
    # sm_90 SASS per element, d_state 16: forward 10 instructions at
    # (BT 32, BD 8, NI 4), 14 at NI 2, 26 at NI 1; backward phase 2 at BD 16:
    # 34 at (BT 4, NI 4, 1 warp), 42 at (8, 2, 2 warps), 46 at (8, 4, 2),
    # 63 at (8, 1, 4). One warp with BD * NL > 32 holds several channels per
    # thread, so the sums over channels (dB, dC) start with adds in registers
    # and need no shared memory; BT 4 keeps that within 32 elements a thread.
    _FWD_CONFIGS = [
        triton.Config({"BT": bt, "BD": bd, "NI": ni}, num_warps=nw, num_stages=1)
        for bt in (16, 32) for bd in (4, 8, 16, 32) for ni in (1, 2, 4, 8) for nw in (1, 2, 4)
    ]
    # BD of the backward is the host's choice (it sets the partial-sum buffer's shape)
    _BWD_CONFIGS = [
        triton.Config({"BT": bt, "NI": ni}, num_warps=nw, num_stages=1)
        for bt in (4, 8, 16) for ni in (1, 2, 4, 8) for nw in (1, 2, 4, 8)
    ]
_BWD_C_CONFIGS = _BWD_CONFIGS
if AUTOTUNE and not INTERPRET:
    _BWD_C_CONFIGS = _BWD_CONFIGS + [
        triton.Config({"BT": bt, "NI": ni}, num_warps=nw, num_stages=1, maxnreg=cap)
        for bt, ni, nw in ((4, 4, 1), (8, 2, 2), (8, 4, 2)) for cap in _BWD_REG_CAPS
    ]


def _fallback_config(bn: int, gsize: int, bd: int | None = None):
    # for shapes no config fits: one state per thread, the largest block in a group
    bd = bd or _pow2_divisor(gsize, 16)
    return bd, {"BT": 16, "NI": 1}, max(1, min(8, bd * bn // 32))


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------
# Approximate MUFU forms on the GPU (ftz: results below 2^-126 are zero, as
# good as exact here); tl.exp2 & co. lower to forms that ptxas guards against
# denormals with compares and extra multiplies, and tl.log / division to
# polynomial or Newton sequences. The interpreter has no inline asm.
@triton.jit
def _exp2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    return _rcp(1.0 + _exp2(-x * LOG2E, FAST), FAST)


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    # torch's softplus: x above 20, else log1p(exp(x)); log1p(e) as
    # log(u) * e / (u - 1), u = 1 + e, keeps precision where e is tiny
    e = _exp2(tl.minimum(x, 20.0) * LOG2E, FAST)
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, (_log2(u, FAST) * LN2) * (e * _rcp(u - 1.0, FAST)))
    return tl.where(x > 20.0, x, lp)


# Tiles are 4-D, [NI, BT, BD, NL]: state index n = i * NL + j splits into NI
# values held by each thread (dim 0) and NL lanes (dim 3). Triton's default
# layout fills lanes and warps from the last dim, so NL and BD take all the
# threads (BD * NL >= 32 * num_warps, pruned) and NI, BT stay in registers:
# the scan over time is a chain of FMAs in each thread, and a sum over n is
# NI - 1 adds in a thread plus log2(NL) shuffle rounds. NI = 1 gives the most
# threads (batch 1); NI > 1 fewer shuffles per element.


@triton.jit
def _tile_decay(
    dt, dt_bias, seq_idx, b_A2, i_b, i_t, o_d, L,
    s_dtb, s_dtt, s_sb, s_st,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    BT: tl.constexpr,
):
    """delta (before and after softplus), the decays of one tile, and where documents start."""
    i_b64 = tl.cast(i_b, tl.int64)
    t0 = tl.cast(i_t, tl.int64) * BT
    o_tl = tl.arange(0, BT)
    o_t = i_t * BT + o_tl
    m_t = o_t < L
    p_dt = dt + i_b64 * s_dtb + t0 * s_dtt + o_tl[:, None] * s_dtt + o_d[None, :]
    b_dtr = tl.load(p_dt, mask=m_t[:, None], other=0.0).to(tl.float32)  # [BT, BD]
    if HAS_BIAS:
        b_dtr += tl.load(dt_bias + o_d).to(tl.float32)[None, :]
    if SOFTPLUS:
        b_dt = _softplus(b_dtr, FAST_MATH)
    else:
        b_dt = b_dtr
    # steps past the end: decay 1, input 0, so the state passes through
    b_dt = tl.where(m_t[:, None], b_dt, 0.0)
    b_a = _exp2(b_dt[None, :, :, None] * b_A2[:, None, :, :], FAST_MATH)  # [NI, BT, BD, NL]
    b_new = o_tl < 0  # [BT] a document starts here (step > 0)
    if HAS_SEQ:
        p_s = seq_idx + i_b64 * s_sb + t0 * s_st + o_tl * s_st
        b_s = tl.load(p_s, mask=m_t, other=0)
        b_sp = tl.load(p_s - s_st, mask=m_t & (o_t > 0), other=0)
        b_new = (b_s != b_sp) & (o_t > 0) & m_t
        # a new document zeroes the decay, i.e. drops h_{t-1}
        b_a = tl.where(b_new[None, :, None, None], 0.0, b_a)
    return b_dtr, b_dt, b_a, b_new


@triton.jit
def _tile_states(
    x, dt, B, dt_bias, seq_idx, b_A2, b_h,
    i_b, i_t, i_g, o_d, o_n3, L, N,
    s_xb, s_xt, s_dtb, s_dtt, s_Bb, s_Bt, s_Bg, s_sb, s_st,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    BT: tl.constexpr,
):
    """States h_t of one tile from the state b_h before it, and what they are made of."""
    b_dtr, b_dt, b_a, _ = _tile_decay(
        dt, dt_bias, seq_idx, b_A2, i_b, i_t, o_d, L, s_dtb, s_dtt, s_sb, s_st,
        HAS_BIAS, SOFTPLUS, HAS_SEQ, BT,
    )
    i_b64 = tl.cast(i_b, tl.int64)
    t0 = tl.cast(i_t, tl.int64) * BT
    o_tl = tl.arange(0, BT)
    m_t = i_t * BT + o_tl < L
    p_x = x + i_b64 * s_xb + t0 * s_xt + o_tl[:, None] * s_xt + o_d[None, :]
    b_x = tl.load(p_x, mask=m_t[:, None], other=0.0).to(tl.float32)  # [BT, BD]
    b_u = b_dt * b_x  # [BT, BD]
    p_B = B + i_b64 * s_Bb + t0 * s_Bt + i_g * s_Bg + o_tl[None, :, None] * s_Bt + o_n3
    b_B = tl.load(p_B, mask=m_t[None, :, None] & (o_n3 < N), other=0.0).to(tl.float32)  # [NI, BT, NL]
    b_ub = b_u[None, :, :, None] * b_B[:, :, None, :]  # [NI, BT, BD, NL]
    # fold the carried state into the first step, so the scanned b is h itself
    b_in = tl.where((o_tl == 0)[None, :, None, None], b_ub + b_a * b_h[:, None, :, :], b_ub)
    b_cum, b_hs = tl.associative_scan((b_a, b_in), 1, _affine_combine)  # [NI, BT, BD, NL]
    return b_x, b_dtr, b_dt, b_a, b_u, b_B, b_ub, b_hs, b_cum


@triton.jit
def _tile_dy(
    dout, z, i_b, i_t, o_d, L, s_dob, s_dot, s_zb, s_zt,
    HAS_Z: tl.constexpr, BT: tl.constexpr,
):
    """dout, the gradient reaching y before the gate, z and sigmoid(z) of one tile."""
    i_b64 = tl.cast(i_b, tl.int64)
    t0 = tl.cast(i_t, tl.int64) * BT
    o_tl = tl.arange(0, BT)
    m_t = i_t * BT + o_tl < L
    p_do = dout + i_b64 * s_dob + t0 * s_dot + o_tl[:, None] * s_dot + o_d[None, :]
    b_do = tl.load(p_do, mask=m_t[:, None], other=0.0).to(tl.float32)  # [BT, BD]
    if HAS_Z:
        p_z = z + i_b64 * s_zb + t0 * s_zt + o_tl[:, None] * s_zt + o_d[None, :]
        b_z = tl.load(p_z, mask=m_t[:, None], other=0.0).to(tl.float32)
        b_sig = _sigmoid(b_z, FAST_MATH)
        b_dy = b_do * (b_z * b_sig)
    else:
        b_z, b_sig, b_dy = b_do, b_do, b_do
    return b_do, b_dy, b_z, b_sig


@triton.jit
def _tile_adjoint(b_a, b_beta, b_c, BT: tl.constexpr):
    """g_t of one tile from beta_t = dy_t C_t and the carry abar g of the step after it.

    Returns g and the carry for the tile before: abar g at the tile's first step.
    """
    o_tl = tl.arange(0, BT)
    b_beta = tl.where((o_tl == BT - 1)[None, :, None, None], b_beta + b_c[:, None, :, :], b_beta)
    # reverse scan as flip + forward scan: with time inside each thread the
    # flips are register renames, while reverse=True costs ~15 shuffles per
    # element on sm_90 (Triton 3.7)
    _, _, b_g = tl.associative_scan(
        (tl.flip(b_a, 1), tl.full(b_a.shape, 1.0, tl.float32), tl.flip(b_beta, 1)), 1, _adjoint_combine
    )
    b_g = tl.flip(b_g, 1)  # [NI, BT, BD, NL]
    b_c = tl.sum(tl.where((o_tl == 0)[None, :, None, None], b_a * b_g, 0.0), axis=1)
    return b_g, b_c


@triton.jit
def _last_step(b, BT: tl.constexpr):
    # [NI, BT, BD, NL] -> [NI, BD, NL]; time is in registers, so this is a move
    o_tl = tl.arange(0, BT)
    return tl.sum(tl.where((o_tl == BT - 1)[None, :, None, None], b, 0.0), axis=1)


@triton.jit
def _sum_n(b):
    # [NI, BT, BD, NL] -> [BT, BD]: in-thread adds first, then across lanes
    return tl.sum(tl.sum(b, axis=0), axis=2)


@autotune(configs=_FWD_CONFIGS, key=["D", "N", "GSIZE", "BATCH", "LOCAL", "WALK"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd_kernel(
    x, dt, A, B, C, Dp, z, dt_bias, seq_idx,
    y, hT, ckpt, c_loc, P,
    L, D, N, GSIZE, S, BATCH,
    s_xb, s_xt, s_dtb, s_dtt, s_zb, s_zt,
    s_Bb, s_Bt, s_Bg, s_Cb, s_Ct, s_Cg, s_sb, s_st,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, LOCAL: tl.constexpr, WALK: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, NI: tl.constexpr,
):
    """One program per (BD channels, batch row, segment of S steps).

    LOCAL (pass 1): the segment's end state from a zero start (c_loc) and the
    product of its decays (P), so that its true end state is c_loc + P * start.
    Otherwise (pass 3): the outputs y of the segment from its true start state
    in ckpt; the last segment writes the final state. WALK (one program per
    (BD channels, batch row), no pass 1): the outputs of every segment in
    turn from the first one's start in ckpt, saving the later segments'
    starts to ckpt as it reaches them.
    """
    NL: tl.constexpr = BN // NI
    i_d, i_b, i_seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64 = tl.cast(i_b, tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    o_n3 = tl.arange(0, NI)[:, None, None] * NL + tl.arange(0, NL)[None, None, :]  # [NI, 1, NL]
    m_n3 = o_n3 < N
    # BD divides GSIZE (the host sees to it): one group per program
    i_g = (i_d * BD) // GSIZE
    o_dn = o_d[None, :, None] * N + o_n3  # [NI, BD, NL]
    b_A2 = tl.load(A + o_dn, mask=m_n3, other=0.0) * LOG2E
    NS = tl.cdiv(L, S)
    o_seg = (i_b64 * NS + i_seg) * D * N + o_dn
    if LOCAL:
        b_h = tl.zeros([NI, BD, NL], dtype=tl.float32)
        b_P = tl.full([NI, BD, NL], 1.0, dtype=tl.float32)
    else:
        b_h = tl.load(ckpt + o_seg, mask=m_n3, other=0.0)
    if HAS_D:
        b_D = tl.load(Dp + o_d).to(tl.float32)
    o_tl = tl.arange(0, BT)
    TPS = S // BT
    if WALK:
        t_first = 0
        t_end = tl.cdiv(L, BT)
    else:
        t_first = i_seg * TPS
        t_end = tl.minimum(t_first + TPS, tl.cdiv(L, BT))
    for i_t in range(t_first, t_end):
        if WALK:
            if (i_t % TPS == 0) & (i_t > 0):
                tl.store(ckpt + (i_b64 * NS + i_t // TPS) * D * N + o_dn, b_h, mask=m_n3)
        b_x, b_dtr, b_dt, b_a, b_u, b_B, b_ub, b_hs, b_cum = _tile_states(
            x, dt, B, dt_bias, seq_idx, b_A2, b_h,
            i_b, i_t, i_g, o_d, o_n3, L, N,
            s_xb, s_xt, s_dtb, s_dtt, s_Bb, s_Bt, s_Bg, s_sb, s_st,
            HAS_BIAS, SOFTPLUS, HAS_SEQ, BT,
        )
        if LOCAL:
            b_P *= _last_step(b_cum, BT)
        else:
            t0 = tl.cast(i_t, tl.int64) * BT
            m_t = i_t * BT + o_tl < L
            p_C = C + i_b64 * s_Cb + t0 * s_Ct + i_g * s_Cg + o_tl[None, :, None] * s_Ct + o_n3
            b_C = tl.load(p_C, mask=m_t[None, :, None] & m_n3, other=0.0).to(tl.float32)  # [NI, BT, NL]
            b_y = _sum_n(b_hs * b_C[:, :, None, :])  # [BT, BD]
            if HAS_D:
                b_y += b_x * b_D[None, :]
            if HAS_Z:
                p_z = z + i_b64 * s_zb + t0 * s_zt + o_tl[:, None] * s_zt + o_d[None, :]
                b_z = tl.load(p_z, mask=m_t[:, None], other=0.0).to(tl.float32)
                b_y *= b_z * _sigmoid(b_z, FAST_MATH)
            p_y = y + (i_b64 * L + t0) * D + o_tl[:, None] * D + o_d[None, :]
            tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_t[:, None])
        b_h = _last_step(b_hs, BT)  # [NI, BD, NL]
    if LOCAL:
        tl.store(c_loc + o_seg, b_h, mask=m_n3)
        tl.store(P + o_seg, b_P, mask=m_n3)
    elif WALK:
        tl.store(hT + i_b64 * D * N + o_dn, b_h, mask=m_n3)
    elif i_seg == NS - 1:
        tl.store(hT + i_b64 * D * N + o_dn, b_h, mask=m_n3)


@autotune(configs=_BWD_CONFIGS, key=["D", "N", "GSIZE", "BD"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_carry_kernel(
    dt, A, C, z, dt_bias, seq_idx, dout, c_loc, P,
    L, D, N, GSIZE, S,
    s_dtb, s_dtt, s_zb, s_zt, s_dob, s_dot, s_Cb, s_Ct, s_Cg, s_sb, s_st,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, NI: tl.constexpr,
):
    """Backward pass A, one program per (channel block, batch row, segment).

    The adjoint at the segment's first step for a zero carry from the next
    segment, abar g (c_loc), and the product of the segment's decays (P): the
    true carry then is c_loc + P * (carry from the next segment).
    """
    NL: tl.constexpr = BN // NI
    i_d, i_b, i_seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64 = tl.cast(i_b, tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    o_n3 = tl.arange(0, NI)[:, None, None] * NL + tl.arange(0, NL)[None, None, :]  # [NI, 1, NL]
    m_n3 = o_n3 < N
    i_g = (i_d * BD) // GSIZE
    o_dn = o_d[None, :, None] * N + o_n3  # [NI, BD, NL]
    b_A2 = tl.load(A + o_dn, mask=m_n3, other=0.0) * LOG2E
    o_tl = tl.arange(0, BT)
    TPS = S // BT
    t_first = i_seg * TPS
    n_tiles = tl.minimum(TPS, tl.cdiv(L, BT) - t_first)
    b_c = tl.zeros([NI, BD, NL], dtype=tl.float32)
    b_sdt = tl.zeros([BT, BD], dtype=tl.float32)
    b_reset = tl.zeros([BT], dtype=tl.int32)
    for kk in range(0, n_tiles):
        i_t = t_first + n_tiles - 1 - kk
        _, b_dt, b_a, b_new = _tile_decay(
            dt, dt_bias, seq_idx, b_A2, i_b, i_t, o_d, L, s_dtb, s_dtt, s_sb, s_st,
            HAS_BIAS, SOFTPLUS, HAS_SEQ, BT,
        )
        _, b_dy, _, _ = _tile_dy(dout, z, i_b, i_t, o_d, L, s_dob, s_dot, s_zb, s_zt, HAS_Z, BT)
        t0 = tl.cast(i_t, tl.int64) * BT
        m_t = i_t * BT + o_tl < L
        p_C = C + i_b64 * s_Cb + t0 * s_Ct + i_g * s_Cg + o_tl[None, :, None] * s_Ct + o_n3
        b_C = tl.load(p_C, mask=m_t[None, :, None] & m_n3, other=0.0).to(tl.float32)  # [NI, BT, NL]
        _, b_c = _tile_adjoint(b_a, b_dy[None, :, :, None] * b_C[:, :, None, :], b_c, BT)
        b_sdt += b_dt
        b_reset = tl.maximum(b_reset, b_new.to(tl.int32))
    # prod_t exp(delta_t A) = exp(A sum_t delta_t), zero past a document start
    b_P = _exp2(tl.sum(b_sdt, axis=0)[None, :, None] * b_A2, FAST_MATH)
    b_P = tl.where(tl.max(b_reset, axis=0) > 0, 0.0, b_P)
    o_seg = (i_b64 * tl.cdiv(L, S) + i_seg) * D * N + o_dn
    tl.store(c_loc + o_seg, b_c, mask=m_n3)
    tl.store(P + o_seg, b_P, mask=m_n3)


@triton.jit
def _chain_kernel(c_loc, P, h_in, starts, h_out, NS, DN,
                  HAS_IN: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2 of both directions: what enters every segment (in the walk's order: last to first with
    REVERSE), from what enters the first: starts[s] = h, then h = c_loc[s] + P[s] * h. NS short steps;
    h_out gets what leaves the last segment (the initial state's gradient in the backward)."""
    i_c, i_b = tl.program_id(0), tl.program_id(1)
    i_b64 = tl.cast(i_b, tl.int64)
    o = i_c * BLOCK + tl.arange(0, BLOCK)
    m = o < DN
    if HAS_IN:
        b_h = tl.load(h_in + i_b64 * DN + o, mask=m, other=0.0)
    else:
        b_h = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, NS):
        i_s = NS - 1 - i if REVERSE else i
        o_seg = (i_b64 * NS + i_s) * DN + o
        tl.store(starts + o_seg, b_h, mask=m)
        b_h = tl.load(c_loc + o_seg, mask=m, other=0.0) + tl.load(P + o_seg, mask=m, other=0.0) * b_h
    tl.store(h_out + i_b64 * DN + o, b_h, mask=m)


@autotune(configs=_BWD_C_CONFIGS, key=["D", "N", "GSIZE", "BD", "NG"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_kernel(
    x, dt, A, B, C, Dp, z, dt_bias, seq_idx, dout, ckpt, carry, scratch,
    dx, ddt, dz, dB_part, dC_part, dA_part, dD_part, dbias_part,
    L, D, N, GSIZE, S, NSB, NG, SEG0, SEG1, B0, LP,
    s_xb, s_xt, s_dtb, s_dtt, s_zb, s_zt, s_dob, s_dot,
    s_Bb, s_Bt, s_Bg, s_Cb, s_Ct, s_Cg, s_sb, s_st, s_scb, s_sck,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, NI: tl.constexpr,
):
    """Backward pass C for one round: a program per (BD channels, batch row B0 + i, NG-th of segments SEG0..SEG1).

    Segments are independent now that their carries are known. For each of
    its segments: phase 1 recomputes the states at the start of every tile
    into the program's scratch, phase 2 walks the tiles backwards with the
    adjoint scan. dB and dC are summed over the block's channels and stored
    as the block's partial sums of the round: (row - B0, step - SEG0 * S)
    of a (rows, LP, NSB, N) buffer that the host sums over blocks.
    """
    NL: tl.constexpr = BN // NI
    i_sb0, i_bl, i_grp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = B0 + i_bl
    i_b64 = tl.cast(i_b, tl.int64)
    i_bl64 = tl.cast(i_bl, tl.int64)
    o_n3 = tl.arange(0, NI)[:, None, None] * NL + tl.arange(0, NL)[None, None, :]  # [NI, 1, NL]
    m_n3 = o_n3 < N
    i_g = (i_sb0 * BD) // GSIZE
    o_tl = tl.arange(0, BT)
    o_d = i_sb0 * BD + tl.arange(0, BD)
    o_dn = o_d[None, :, None] * N + o_n3  # [NI, BD, NL]
    b_A2 = tl.load(A + o_dn, mask=m_n3, other=0.0) * LOG2E
    if HAS_D:
        b_D = tl.load(Dp + o_d).to(tl.float32)
    # the program's own scratch, reused by each of its segments
    p_scr = scratch + ((i_bl64 * NG + i_grp) * NSB + i_sb0) * s_scb
    o_scr = tl.arange(0, BD)[None, :, None] * BN + o_n3  # [NI, BD, NL]
    TPS = S // BT
    NT = tl.cdiv(L, BT)
    NS = tl.cdiv(L, S)
    for i_seg in range(SEG0 + i_grp, SEG1, NG):
        t_first = i_seg * TPS
        n_tiles = tl.minimum(TPS, NT - t_first)
        b_dA = tl.zeros([NI, BD, NL], dtype=tl.float32)
        # summed over time once at the end: [BT, BD] tiles have time across threads
        b_dD = tl.zeros([BT, BD], dtype=tl.float32)
        b_dbias = tl.zeros([BT, BD], dtype=tl.float32)
        o_seg = (i_b64 * NS + i_seg) * D * N + o_dn
        b_h = tl.load(ckpt + o_seg, mask=m_n3, other=0.0)
        # adjoint flowing into the step after the current tile: abar_{t+1} g_{t+1}
        b_c = tl.load(carry + o_seg, mask=m_n3, other=0.0)
        # the previous phase 2 read the scratch written below
        tl.debug_barrier()
        # phase 1: states at the start of every tile of the segment, to scratch
        for k in range(0, n_tiles - 1):
            tl.store(p_scr + k * s_sck + o_scr, b_h)
            _, _, _, _, _, _, _, b_hs, _ = _tile_states(
                x, dt, B, dt_bias, seq_idx, b_A2, b_h,
                i_b, t_first + k, i_g, o_d, o_n3, L, N,
                s_xb, s_xt, s_dtb, s_dtt, s_Bb, s_Bt, s_Bg, s_sb, s_st,
                HAS_BIAS, SOFTPLUS, HAS_SEQ, BT,
            )
            b_h = _last_step(b_hs, BT)
        tl.store(p_scr + (n_tiles - 1) * s_sck + o_scr, b_h)
        # scratch is written and read by different threads of the program
        tl.debug_barrier()
        # phase 2: tiles last to first, adjoint as a reverse scan
        for kk in range(0, n_tiles):
            k = n_tiles - 1 - kk
            i_t = t_first + k
            t0 = tl.cast(i_t, tl.int64) * BT
            m_t = i_t * BT + o_tl < L
            b_h0 = tl.load(p_scr + k * s_sck + o_scr)
            b_x, b_dtr, b_dt, b_a, b_u, b_B, b_ub, b_hs, _ = _tile_states(
                x, dt, B, dt_bias, seq_idx, b_A2, b_h0,
                i_b, i_t, i_g, o_d, o_n3, L, N,
                s_xb, s_xt, s_dtb, s_dtt, s_Bb, s_Bt, s_Bg, s_sb, s_st,
                HAS_BIAS, SOFTPLUS, HAS_SEQ, BT,
            )
            p_C = C + i_b64 * s_Cb + t0 * s_Ct + i_g * s_Cg + o_tl[None, :, None] * s_Ct + o_n3
            b_C = tl.load(p_C, mask=m_t[None, :, None] & m_n3, other=0.0).to(tl.float32)  # [NI, BT, NL]
            b_do, b_dy, b_z, b_sig = _tile_dy(dout, z, i_b, i_t, o_d, L, s_dob, s_dot, s_zb, s_zt, HAS_Z, BT)
            # what needs h_t itself first, so that only h_t - u_t B_t stays live through the adjoint
            b_dC = tl.sum(b_hs * b_dy[None, :, :, None], axis=2)  # [NI, BT, NL]
            if HAS_Z:
                b_y = _sum_n(b_hs * b_C[:, :, None, :])
                if HAS_D:
                    b_y += b_x * b_D[None, :]
                b_dz = b_do * b_y * b_sig * (1.0 + b_z * (1.0 - b_sig))
                p_dz = dz + (i_b64 * L + t0) * D + o_tl[:, None] * D + o_d[None, :]
                tl.store(p_dz, b_dz.to(dz.dtype.element_ty), mask=m_t[:, None])
            b_hp = b_hs - b_ub  # abar_t h_{t-1}
            b_g, b_c = _tile_adjoint(b_a, b_dy[None, :, :, None] * b_C[:, :, None, :], b_c, BT)
            # g_t * abar_t * h_{t-1}: the gradient reaching abar_t, times abar_t
            b_q = b_g * b_hp
            b_dA += tl.sum(b_q * b_dt[None, :, :, None], axis=1)
            b_du = _sum_n(b_g * b_B[:, :, None, :])  # [BT, BD]
            # sum_n q A = ln 2 * sum_n q A2: one multiply per (t, d), and A need not stay live
            b_ddt = b_du * b_x + _sum_n(b_q * b_A2[:, None, :, :]) * LN2
            b_dx = b_du * b_dt
            if HAS_D:
                b_dx += b_dy * b_D[None, :]
                b_dD += b_dy * b_x
            if SOFTPLUS:
                b_ddt *= _sigmoid(b_dtr, FAST_MATH)
            # past the end the carried adjoint is not zero: keep it out of the sums
            b_ddt = tl.where(m_t[:, None], b_ddt, 0.0)
            b_dbias += b_ddt
            p_dx = dx + (i_b64 * L + t0) * D + o_tl[:, None] * D + o_d[None, :]
            tl.store(p_dx, b_dx.to(dx.dtype.element_ty), mask=m_t[:, None])
            p_ddt = ddt + (i_b64 * L + t0) * D + o_tl[:, None] * D + o_d[None, :]
            tl.store(p_ddt, b_ddt.to(ddt.dtype.element_ty), mask=m_t[:, None])
            # the block's sums over its channels, at (row, step) of the round
            b_dB = tl.sum(b_g * b_u[None, :, :, None], axis=2)
            o_part = ((i_bl64 * LP + t0 - SEG0 * S) * NSB + i_sb0) * N + o_tl[None, :, None] * (NSB * N) + o_n3
            m_part = m_t[None, :, None] & m_n3
            tl.store(dB_part + o_part, b_dB, mask=m_part)
            tl.store(dC_part + o_part, b_dC, mask=m_part)
        o_p = (i_b64 * NS + i_seg) * D
        tl.store(dA_part + o_p * N + o_dn, b_dA, mask=m_n3)
        tl.store(dD_part + o_p + o_d, tl.sum(b_dD, axis=0))
        tl.store(dbias_part + o_p + o_d, tl.sum(b_dbias, axis=0))


# --------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------

def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    # kernels index the last dim with stride 1 and take the other strides as given
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _check_steps() -> None:
    bts = [c.kwargs["BT"] for c in _FWD_CONFIGS + _BWD_C_CONFIGS]  # pass C's space holds pass A's
    assert CHECKPOINT_STEPS % max(bts) == 0, "CHECKPOINT_STEPS must be a multiple of every BT"


def _f32(t: torch.Tensor) -> torch.Tensor:
    # B and C are d_state values per step, x and dt channels: an fp32 copy
    # is cheap, and each of their values is used by a whole block of
    # channels, where unpacking bf16 would cost an instruction per element
    return _rows(t.float())


def _scratch_bt() -> int:
    # smallest BT the backward may run with (configs or the fallback's 16)
    return min([16] + [c.kwargs["BT"] for c in _BWD_C_CONFIGS])


def _bwd_block_d(gsize: int) -> int:
    # Channels per backward program. Each program writes d_state fp32 partial
    # sums of dB and dC per step (written, then read by torch's sum: 16 *
    # d_state bytes per step and program; 1536 channels in blocks of 16: 12 KB
    # per token). The segments give the parallelism, so blocks can be this large.
    return _pow2_divisor(gsize, 16)


# Pass C runs in rounds, each over some batch rows and segments: a program
# stores dB, dC summed over its one block of channels per step, and the host
# sums the blocks' partials after each round. Programs that each added
# several blocks in turn into one partial per step (read, add, write) took
# 162 ms at 1M tokens where one block a program takes 145 to 149, whatever
# the program count (benchmarks/selective_bwd_grid_h100.json); the rounds
# bound the partials' memory, which one block a program multiplies.
# dB and dC partial sums of one round at most:
BWD_ROUND_BYTES = 1 << 30
# Programs of one round at most: each holds a tile-start scratch of
# CHECKPOINT_STEPS / BT x BD x d_state fp32 (128 KB at BT 4, BD 16, d_state 16).
BWD_PROGRAMS = 6144


def _bwd_rounds(batch: int, nblk: int, d_state: int, nseg: int) -> tuple[int, int, int]:
    """(rows, segments, NG) of backward pass C's rounds: the batch rows and segments one round covers, and its
    programs along those segments (each takes every NG-th of them)."""
    row_segment_bytes = CHECKPOINT_STEPS * nblk * d_state * 8  # dB and dC partials, fp32
    units = max(1, BWD_ROUND_BYTES // row_segment_bytes)  # (row, segment) pairs a round
    ng = max(1, min(nseg, BWD_PROGRAMS // nblk))
    if units < nseg:  # part of a row a round, a multiple of NG segments: every program takes as many
        return 1, min(nseg, max(ng, units // ng * ng)), ng
    rows = max(1, min(batch, units // nseg, BWD_PROGRAMS // nblk))
    return rows, nseg, max(1, min(nseg, BWD_PROGRAMS // (nblk * rows)))


# The forward walks each row's segments in one program (no pass 1, one pass of
# exponentials fewer) when batch x channels gives the GPU this many channels
# at once (BD of them a program). H100, 1536 channels, forward ms parallel /
# walked: 4k x 256 34.2 / 24.4, 64k x 16 34.4 / 29.5, 8k x 8 2.39 / 2.21,
# 256k x 4 34.5 / 39.2, 1M x 1 35.2 / 131 (benchmarks/selective_fwd_walk_h100.json).
FWD_WALK_CHANNELS = 8 * 1536


def _fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx):
    batch, length, channels = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    assert channels % groups == 0, "channels must be divisible by groups"
    gsize = channels // groups
    x, dt, z, seq_idx = (_rows(t) for t in (x, dt, z, seq_idx))
    B, C = _f32(B), _f32(C)
    A = A.float().contiguous()
    D = None if D is None else D.contiguous()
    dt_bias = None if dt_bias is None else dt_bias.contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    dev = x.device
    y = new_buffer(batch, length, channels, device=dev, dtype=x.dtype)
    hT = new_buffer(batch, channels, d_state, device=dev)
    _check_steps()
    nseg = cdiv(length, CHECKPOINT_STEPS)
    ckpt = new_buffer(batch, nseg, channels, d_state, device=dev)
    # enough programs without parallel segments: one walks a row's segments (no pass 1)
    walk = nseg > 1 and batch * channels >= FWD_WALK_CHANNELS
    parallel = nseg > 1 and not walk
    # pass 1's outputs (segment end states from zero, decay products); unused without it
    c_loc = new_buffer(batch, nseg, channels, d_state, device=dev) if parallel else ckpt
    P = new_buffer(batch, nseg, channels, d_state, device=dev) if parallel else ckpt
    if length == 0:
        return y, (h0.clone() if h0 is not None else hT.zero_()), ckpt
    sB, sC = B.stride(), C.stride()
    s_seq = seq_idx.stride() if seq_idx is not None else (0, 0)
    s_z = z.stride() if z is not None else (0, 0, 0)
    bn = next_power_of_2(d_state)
    programs = nseg if parallel else 1  # along the segments
    if any(_fits(c, bn, gsize, c.kwargs["BD"], True) for c in _FWD_CONFIGS):
        kernel = _fwd_kernel[lambda meta: (channels // meta["BD"], batch, programs)]
    else:  # nothing fits (odd group sizes, tiny d_state): a plain launch
        bd, kw, nw = _fallback_config(bn, gsize)
        kernel = functools.partial(_fwd_kernel.fn[(channels // bd, batch, programs)], BD=bd, num_warps=nw, **kw)
    args = (
        x, dt, A, B, C, D, z, dt_bias, seq_idx,
        y, hT, ckpt, c_loc, P,
        length, channels, d_state, gsize, CHECKPOINT_STEPS, batch,
        x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), s_z[0], s_z[1],
        sB[0], sB[1], sB[2], sC[0], sC[1], sC[2], s_seq[0], s_seq[1],
    )
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
                 SOFTPLUS=dt_softplus, HAS_SEQ=seq_idx is not None, BN=bn)
    if parallel:
        # segments run in parallel (batch 1 has too few channel blocks to fill the GPU):
        # pass 1 each segment's end state from zero and its decay product, pass 2 chains them
        kernel(*args, LOCAL=True, WALK=False, **flags)
        dn = channels * d_state
        _chain_kernel[(cdiv(dn, 1024), batch)](
            c_loc, P, h0, ckpt, hT, nseg, dn, HAS_IN=h0 is not None, REVERSE=False, BLOCK=1024,
        )  # hT is written again, by pass 3's last segment
    elif h0 is not None:
        ckpt[:, 0].copy_(h0)
    else:
        ckpt[:, 0].zero_()
    # pass 3: outputs, segments in parallel from their true start states (or walked in turn)
    kernel(*args, LOCAL=False, WALK=walk, **flags)
    return y, hT, ckpt


def _bwd(dout, dhT, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx, ckpt):
    batch, length, channels = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    gsize = channels // groups
    dev = x.device
    B_dtype, C_dtype = B.dtype, C.dtype
    x, dt, z, seq_idx, dout = (_rows(t) for t in (x, dt, z, seq_idx, dout))
    B, C = _f32(B), _f32(C)
    A32 = A.float().contiguous()
    Dc = None if D is None else D.contiguous()
    bias = None if dt_bias is None else dt_bias.contiguous()
    dhT = None if dhT is None else dhT.float().contiguous()
    bn = next_power_of_2(d_state)
    bd = _bwd_block_d(gsize)
    nblk = channels // bd
    nseg = cdiv(length, CHECKPOINT_STEPS)
    rows, segs, ngrp = _bwd_rounds(batch, nblk, d_state, nseg)
    dx = new_buffer(batch, length, channels, device=dev, dtype=x.dtype)
    ddt = new_buffer(batch, length, channels, device=dev, dtype=dt.dtype)
    dz = new_buffer(batch, length, channels, device=dev, dtype=z.dtype) if z is not None else None
    # per round: dB, dC summed over each block of channels; summed over the blocks into dB, dC after it
    dB_part = new_buffer(rows, min(length, segs * CHECKPOINT_STEPS), nblk, d_state, device=dev)
    dC_part = new_buffer(*dB_part.shape, device=dev)
    dB = new_buffer(batch, length, groups, d_state, device=dev)
    dC = new_buffer(*dB.shape, device=dev)
    dA_part = new_buffer(batch * nseg, channels, d_state, device=dev)
    dD_part = new_buffer(batch * nseg, channels, device=dev)
    dbias_part = new_buffer(batch * nseg, channels, device=dev)
    dh0 = new_buffer(batch, channels, d_state, device=dev)
    if length == 0:
        for t in (dA_part, dD_part, dbias_part):
            t.zero_()
        dh0.copy_(dhT if dhT is not None else torch.zeros_like(dh0))
    else:
        sB, sC = B.stride(), C.stride()
        s_seq = seq_idx.stride() if seq_idx is not None else (0, 0)
        s_z = z.stride() if z is not None else (0, 0, 0)
        flags = dict(HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
                     HAS_SEQ=seq_idx is not None, BD=bd, BN=bn)
        tuned = any(_fits(c, bn, gsize, bd, False) for c in _BWD_CONFIGS)
        _, kw, nw = _fallback_config(bn, gsize, bd)

        def launch(kernel, grid):
            return kernel[grid] if tuned else functools.partial(kernel.fn[grid], num_warps=nw, **kw)

        # pass A: each segment's adjoint for a zero carry, and its decay product
        c_loc = new_buffer(batch, nseg, channels, d_state, device=dev)
        P = new_buffer(batch, nseg, channels, d_state, device=dev)
        launch(_bwd_carry_kernel, (nblk, batch, nseg))(
            dt, A32, C, z, bias, seq_idx, dout, c_loc, P,
            length, channels, d_state, gsize, CHECKPOINT_STEPS,
            dt.stride(0), dt.stride(1), s_z[0], s_z[1], dout.stride(0), dout.stride(1),
            sC[0], sC[1], sC[2], s_seq[0], s_seq[1],
            **flags,
        )
        # pass B: the carries between segments
        carry = new_buffer(batch, nseg, channels, d_state, device=dev)
        dn = channels * d_state
        _chain_kernel[(cdiv(dn, 1024), batch)](
            c_loc, P, dhT, carry, dh0, nseg, dn, HAS_IN=dhT is not None, REVERSE=True, BLOCK=1024,
        )
        # pass C: all gradients, segments in parallel, in rounds
        scratch = new_buffer(rows * ngrp * nblk, CHECKPOINT_STEPS // _scratch_bt(), bd, bn, device=dev)
        per = nblk // groups
        for b0 in range(0, batch, rows):
            rows_now = min(rows, batch - b0)
            for s0 in range(0, nseg, segs):
                launch(_bwd_kernel, (nblk, rows_now, ngrp))(
                    x, dt, A32, B, C, Dc, z, bias, seq_idx, dout, ckpt, carry, scratch,
                    dx, ddt, dz, dB_part, dC_part, dA_part, dD_part, dbias_part,
                    length, channels, d_state, gsize, CHECKPOINT_STEPS, nblk, ngrp,
                    s0, min(nseg, s0 + segs), b0, dB_part.shape[1],
                    x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), s_z[0], s_z[1],
                    dout.stride(0), dout.stride(1),
                    sB[0], sB[1], sB[2], sC[0], sC[1], sC[2], s_seq[0], s_seq[1],
                    scratch.stride(0), scratch.stride(1),
                    HAS_D=D is not None, **flags,
                )
                t0, t1 = s0 * CHECKPOINT_STEPS, min(length, (s0 + segs) * CHECKPOINT_STEPS)
                for part, total in ((dB_part, dB), (dC_part, dC)):
                    torch.sum(part[:rows_now, :t1 - t0].view(rows_now, t1 - t0, groups, per, d_state), dim=3,
                              out=total[b0:b0 + rows_now, t0:t1])
    dB, dC = dB.to(B_dtype), dC.to(C_dtype)
    # deterministic reductions of the per-segment partial sums
    dA = dA_part.sum(0).to(A.dtype)
    # absent inputs get empty gradients: a custom op returns tensors only
    dD = dD_part.sum(0).to(D.dtype) if D is not None else x.new_empty(0)
    dbias = dbias_part.sum(0).to(dt_bias.dtype) if dt_bias is not None else x.new_empty(0)
    dh0 = dh0.to(initial_state.dtype) if initial_state is not None else x.new_empty(0)
    dz = dz if dz is not None else x.new_empty(0)
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0


# --------------------------------------------------------------------------
# custom op + autograd
# --------------------------------------------------------------------------
Tensor = torch.Tensor


@torch.library.custom_op("mambatrain::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool,
    initial_state: Tensor | None, seq_idx: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return _fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx)


@_selective_scan_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx):
    batch, length, channels = x.shape
    d_state = B.shape[3]
    nseg = (length + CHECKPOINT_STEPS - 1) // CHECKPOINT_STEPS
    f32 = torch.float32
    return (
        x.new_empty(batch, length, channels),
        x.new_empty(batch, channels, d_state, dtype=f32),
        x.new_empty(batch, nseg, channels, d_state, dtype=f32),
    )


@torch.library.custom_op("mambatrain::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(
    dout: Tensor, dhT: Tensor | None, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool,
    initial_state: Tensor | None, seq_idx: Tensor | None, ckpt: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _bwd(dout, dhT, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx, ckpt)


@_selective_scan_bwd.register_fake
def _(dout, dhT, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx, ckpt):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)

    return like(x), like(dt), like(A), like(B), like(C), like(D), like(z), like(dt_bias), like(initial_state)


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, output[2])
    ctx.dt_softplus = dt_softplus
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # unused outputs' gradients arrive as None, not zero tensors


def _backward(ctx, dy, dhT, _dckpt):
    x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, ckpt = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = _selective_scan_bwd(
        dy, dhT, x, dt, A, B, C, D, z, dt_bias, ctx.dt_softplus, initial_state, seq_idx, ckpt
    )

    def opt(g, t):
        return g if t is not None else None

    return (dx, ddt, dA, dB, dC, opt(dD, D), opt(dz, z), opt(dbias, dt_bias), None, opt(dh0, initial_state), None)


_selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------
def selective_scan(
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
):
    """Mamba-1 selective scan (Triton), differentiable in every tensor input.

        dt_t = softplus(dt_t + dt_bias)                  (bias, softplus optional)
        h_t  = exp(dt_t * A) * h_{t-1} + (dt_t * x_t) * B_t      # (channels, d_state)
        y_t  = (h_t @ C_t + D * x_t) * silu(z_t)         (D, z optional)

    with h_{-1} = initial_state (or 0) and h_{t-1} taken as 0 where seq_idx
    changes between t-1 and t. Shapes: x, dt, z (batch, length, channels), x fp32, bf16 or fp16;
    A (channels, d_state) fp32; B, C (batch, length, groups, d_state) with
    channels divisible by groups; D, dt_bias (channels,); initial_state
    (batch, channels, d_state); seq_idx (batch, length) int32. Inputs may be
    strided views. The state is fp32 whatever the input dtype.
    Returns y (batch, length, channels) in x's dtype, and with
    ``return_final_state`` also h_{length-1} (batch, channels, d_state) fp32.
    """
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"selective_scan takes fp32, bf16 or fp16 x, got {x.dtype} "
                        "(float64 takes the PyTorch path: selective_scan_naive)")
    if seq_idx is not None and seq_idx.shape != x.shape[:2]:  # the kernels would read past its end
        raise ValueError(f"seq_idx must be (batch, length) = {tuple(x.shape[:2])}, got {tuple(seq_idx.shape)}")
    y, final_state, _ = _selective_scan_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx)
    return (y, final_state) if return_final_state else y
