"""Backward kernels of the chunked SSD scan (see README.md for the formulas).

Four launches:

1. ``ssd_state_bwd_kernel``: the gradient of the state leaving each chunk,
   dh_c, fp32: the forward state kernel run backwards over the chunks (and
   <dh_c, h_c-1>, which the decay gradient needs).
2. ``ssd_dcb_bwd_kernel``: per (chunk, row block i, group): the gradient of
   S = C B^T, dS_ij = sum over the group's heads of the decay-masked dy_i u_j^T,
   stored for the next kernel, and dC_i = sum_j dS_ij B_j + sum_h (dy_i h_prev);
   plus the pieces of the decay gradient that need dy_i. Summing over heads
   inside the program is what keeps dB and dC per group.
3. ``ssd_dx_bwd_kernel`` (``ssd_dx_one_block_bwd_kernel`` for one-block chunks, the default there):
   per (chunk, column block j, group), heads in a loop:
   du_j = sum_i W_ij^T dy_i + (B_j decayed) dh^T per head, hence dx, dz, the dt
   terms and the D partials; then, summed over heads, dB_j = u_j dh + sum_i dS_ij^T C_i.
4. ``ssd_ddt_bwd_kernel``: the gradient of the in-chunk cumulative sums becomes
   the gradient of dt' (a reversed cumsum), then of the raw dt, A and dt_bias.

Heads of a group may be split over several programs (``NSPLIT``) when there
are too few chunks to fill the GPU; each split writes its own partial dB / dC
(and dS) and torch sums the splits: no atomics, bitwise deterministic.
"""

import triton
import triton.language as tl

from ..settings import autotune, configs
from .triton_fwd import WHOLE_STATE_ROWS, decay_block, dot


@autotune(
    configs=configs(
        # 64 x 64 tiles at 4 warps take 146 registers, three programs per SM; capped at 128, four (offline 20-24 B
        # of spills; picked at 1M, 10.5 -> 9.2 ms on an H100: benchmarks/ssd_maxnreg_h100.json)
        [{"BK": bk, "BV": bv, "num_warps": w, "num_stages": s}
         for bk in (32, 64) for bv in (32, 64) for w in (4, 8) for s in (2, 3)]
        + [{"BK": 64, "BV": 64, "num_warps": 4, "num_stages": s, "maxnreg": 128} for s in (2, 3)]
        # 64 x 128 tiles at 8 warps take 144 registers, one program per SM; capped at 128, two (20 B of spills at 2
        # stages; benchmarks/sass_counts_state_tiles_offline.json)
        + WHOLE_STATE_ROWS + [{"BK": 128, "BV": 64, "num_warps": 8, "num_stages": s, "maxnreg": 128} for s in (2, 3)],
        {"BK": 32, "BV": 32, "num_warps": 4},
        {"BK": 64, "BV": 32, "num_warps": 8, "num_stages": 2},
    ),
    key=["P", "N", "L", "HAS_Z", "T_BUCKET", "LOCAL"],
)
@triton.jit
def ssd_state_bwd_kernel(
    dout, z, C, dtp, dA_cs, doc, states, dhT, dstates, dh0, Kc_part, seg_local, seg_decay,
    T, NT, T_BUCKET, SEG, NSEG, s_ob, s_ot, s_oh, s_op, s_zb, s_zt, s_zh, s_zp, s_Cb, s_Ct, s_Cg, s_Cn,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, KC_TILES: tl.constexpr,
    HAS_DFINAL: tl.constexpr, HAS_Z: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr,
    LOCAL: tl.constexpr,
):
    """Gradients of the states entering every chunk, walking the chunks backwards; segments of SEG chunks
    in parallel as in ``ssd_state_fwd_kernel`` (LOCAL: pass 1; otherwise dhT holds what enters each
    segment from its end, shaped (batch x heads, NSEG, P, N))."""
    i_k, i_v, i_bhs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # the batch x heads of one segment are adjacent: they read the group's B (C) of the same chunks from L2
    BHt = tl.num_programs(2) // NSEG
    i_seg, i_bh = i_bhs // BHt, i_bhs % BHt
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_l = tl.arange(0, L)
    m_k, m_v = o_k < N, o_v < P
    m_vk = m_v[:, None] & m_k[None, :]
    o_vk = o_v[:, None] * N + o_k[None, :]
    p_o0 = dout + i_b.to(tl.int64) * s_ob + i_h * s_oh
    p_z0 = z + i_b.to(tl.int64) * s_zb + i_h * s_zh
    p_C0 = C + i_b.to(tl.int64) * s_Cb + i_g * s_Cg
    o_a0 = i_bh.to(tl.int64) * T
    o_d0 = i_b.to(tl.int64) * T
    # [BK // 32, BV // 32] the Kc_part slots of this program's tile
    KC_V: tl.constexpr = (P + 31) // 32
    o_kc_k = i_k * (BK // 32) + tl.arange(0, BK // 32)
    o_kc_v = i_v * (BV // 32) + tl.arange(0, BV // 32)
    o_kc = o_kc_k[:, None] * KC_V + o_kc_v[None, :]
    m_kc = (o_kc_k < (N + 31) // 32)[:, None] & (o_kc_v < KC_V)[None, :]
    m_kc_first = (o_kc_k == i_k * (BK // 32))[:, None] & (o_kc_v == i_v * (BV // 32))[None, :]

    # [BV, BK] gradient of the state leaving the current chunk
    o_seg = (i_bh.to(tl.int64) * NSEG + i_seg) * (P * N) + o_vk
    b_dh = tl.zeros([BV, BK], dtype=tl.float32)
    b_P = 1.0
    if HAS_DFINAL and not LOCAL:
        b_dh += tl.load(dhT + o_seg, mask=m_vk, other=0.)
    c_end = tl.minimum(NT, i_seg * SEG + SEG)
    for i_r in range(i_seg * SEG, c_end):
        i_c = c_end - 1 - (i_r - i_seg * SEG)
        o_st = (i_bh.to(tl.int64) * NT + i_c) * (P * N) + o_vk
        t0 = i_c * L
        m_t = t0 + o_l < T
        i_end = tl.minimum(t0 + L, T) - 1
        b_a = tl.load(dA_cs + o_a0 + t0 + o_l, mask=m_t, other=0.)
        b_a_end = tl.load(dA_cs + o_a0 + i_end)
        b_g = tl.where(m_t, tl.exp(b_a), 0.)
        b_decay = tl.exp(b_a_end)
        if HAS_DOC:
            b_doc = tl.load(doc + o_d0 + t0 + o_l, mask=m_t, other=-1)
            b_doc_end = tl.load(doc + o_d0 + i_end)
            b_doc_prev = tl.load(doc + o_d0 + tl.maximum(t0 - 1, 0))
            b_g = tl.where(b_doc == b_doc_prev, b_g, 0.)
            b_decay = tl.where(b_doc_end == b_doc_prev, b_decay, 0.)
        if not LOCAL:
            tl.store(dstates + o_st, b_dh.to(dstates.dtype.element_ty), mask=m_vk)
            b_h = tl.load(states + o_st, mask=m_vk, other=0.).to(tl.float32)
            # <dh_c, exp(a_end) h_{c-1}>: how the carried state's decay over the chunk
            # moves the loss; every a of the chunk gets it (ssd_ddt_bwd_kernel)
            # Kc_part has a slot per 32 x 32 piece of the state, whatever the tiles: this program's sum
            # goes to the first slot it covers and zeros to the rest, so every slot is written by every
            # config (the autotuner runs several configs on the same buffers: zeros left from the
            # allocation would not survive them)
            b_kc = b_decay * tl.sum(tl.sum(b_dh * b_h, axis=1), axis=0)
            tl.store(Kc_part + (i_bh.to(tl.int64) * NT + i_c) * KC_TILES + o_kc,
                     tl.where(m_kc_first, b_kc, 0.), mask=m_kc)
        m_vt = m_v[:, None] & m_t[None, :]
        # [BV, L]: dy^T, transposed by the pointers
        b_dyt = tl.load(p_o0 + t0.to(tl.int64) * s_ot + o_l[None, :] * s_ot + o_v[:, None] * s_op,
                        mask=m_vt, other=0.).to(tl.float32)
        if HAS_Z:
            b_zt = tl.load(p_z0 + t0.to(tl.int64) * s_zt + o_l[None, :] * s_zt + o_v[:, None] * s_zp,
                           mask=m_vt, other=0.).to(tl.float32)
            b_dyt = b_dyt * b_zt * tl.sigmoid(b_zt)
        # [L, BK]
        b_C = tl.load(p_C0 + t0.to(tl.int64) * s_Ct + o_l[:, None] * s_Ct + o_k[None, :] * s_Cn,
                      mask=m_t[:, None] & m_k[None, :], other=0.)
        b_dyt = (b_dyt * b_g[None, :]).to(b_C.dtype)
        b_dh = b_dh * b_decay + dot(b_dyt, b_C, PRECISION)
        b_P = b_P * b_decay
    if LOCAL:
        tl.store(seg_local + o_seg, b_dh, mask=m_vk)
        tl.store(seg_decay + i_bh.to(tl.int64) * NSEG + i_seg, b_P)
    elif i_seg == 0:
        tl.store(dh0 + i_bh.to(tl.int64) * (P * N) + o_vk, b_dh, mask=m_vk)


@triton.jit
def load_dy(dout, z, o_row, o_v, m, s_ot, s_op, s_zt, s_zp, HAS_Z: tl.constexpr):
    """dy = dout * silu(z), fp32; ``dout`` and ``z`` already point at the (batch, chunk, head)."""
    b_dy = tl.load(dout + o_row[:, None] * s_ot + o_v[None, :] * s_op, mask=m, other=0.).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z + o_row[:, None] * s_zt + o_v[None, :] * s_zp, mask=m, other=0.).to(tl.float32)
        b_dy = b_dy * b_z * tl.sigmoid(b_z)
    return b_dy


@autotune(
    configs=configs(
        # 4 warps spill a little at d_state 128 (32-44 B offline) but hold two programs per SM; at chunk 64 the
        # head loops are innermost, so num_stages > 1 fetches the next head's tiles (8 warps capped at 128
        # registers, two per SM with ~300 B of spills, lost to 4 warps: benchmarks/ssd_maxnreg_h100.json)
        [{"num_warps": w, "num_stages": s} for w in (4, 8) for s in (1, 2, 3)],
        {"num_warps": 4},
        {"num_warps": 8, "num_stages": 1},
    ),
    key=["P", "N", "L", "BT", "BV", "HPS", "HAS_Z", "T_BUCKET"],
)
@triton.jit
def ssd_dcb_bwd_kernel(
    x, dout, z, B, C, dtp, dA_cs, dA_lo, doc, states, dS, dC_out, dsum, R_part, K_pair, T_pair,
    T, NT, T_BUCKET, BGt, s_xb, s_xt, s_xh, s_xp, s_ob, s_ot, s_oh, s_op, s_zb, s_zt, s_zh, s_zp,
    s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, L: tl.constexpr,
    BT: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, NSPLIT: tl.constexpr, HPS: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_DOC: tl.constexpr, PRECISE: tl.constexpr, PRECISION: tl.constexpr,
    ROW_SCAN: tl.constexpr = False,
):
    NB: tl.constexpr = L // BT
    NV: tl.constexpr = (P + BV - 1) // BV
    i_pid = tl.program_id(0)
    i_sp, i_r = i_pid % NSPLIT, i_pid // NSPLIT
    i_bg, i_ci = i_r % BGt, i_r // BGt
    i_c, i_i = i_ci // NB, i_ci % NB
    i_b, i_g = i_bg // G, i_bg % G
    t0 = i_c * L
    o_i = i_i * BT + tl.arange(0, BT)
    o_n = tl.arange(0, BN)
    m_i, m_n = t0 + o_i < T, o_n < N
    o_d0 = i_b.to(tl.int64) * T + t0
    i_last = tl.minimum(L, T - t0) - 1
    if HAS_DOC:
        b_doc_i = tl.load(doc + o_d0 + o_i, mask=m_i, other=-1)
    i_h0 = i_g * (H // G) + i_sp * HPS
    p_dS0 = dS + (((i_sp * (BGt // G) + i_b) * G + i_g).to(tl.int64) * NT + i_c) * (L * L)
    p_B0 = B + i_b.to(tl.int64) * s_Bb + t0.to(tl.int64) * s_Bt + i_g * s_Bg
    NPAIR: tl.constexpr = NB * (NB + 1) // 2

    if HAS_DOC:
        b_doc_prev = tl.load(doc + i_b.to(tl.int64) * T + tl.maximum(t0 - 1, 0))
    # [BT, BN]
    b_Ci = tl.load(C + i_b.to(tl.int64) * s_Cb + t0.to(tl.int64) * s_Ct + i_g * s_Cg + o_i[:, None] * s_Ct
                   + o_n[None, :] * s_Cn, mask=m_i[:, None] & m_n[None, :], other=0.)
    # dC_i through the carried state: sum over heads of (exp(a_i) dy_i) h_prev
    b_dc = tl.zeros([BT, BN], dtype=tl.float32)
    for i_hh in range(HPS):
        i_h = i_h0 + i_hh
        o_a0 = (i_b * H + i_h).to(tl.int64) * T + t0
        b_g = tl.exp(tl.load(dA_cs + o_a0 + o_i, mask=m_i, other=0.))
        b_g = tl.where(m_i, b_g, 0.)
        if HAS_DOC:
            b_g = tl.where(b_doc_i == b_doc_prev, b_g, 0.)
        p_o0 = dout + i_b.to(tl.int64) * s_ob + t0.to(tl.int64) * s_ot + i_h * s_oh
        p_z0 = z + i_b.to(tl.int64) * s_zb + t0.to(tl.int64) * s_zt + i_h * s_zh
        p_h0 = states + ((i_b * H + i_h).to(tl.int64) * NT + i_c) * (P * N)
        b_dch = tl.zeros([BT, BN], dtype=tl.float32)
        for i_v in range(NV):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < P
            b_dy = load_dy(p_o0, p_z0, o_i, o_v, m_i[:, None] & m_v[None, :], s_ot, s_op, s_zt, s_zp, HAS_Z)
            # [BV, BN]
            b_h = tl.load(p_h0 + o_v[:, None] * N + o_n[None, :], mask=m_v[:, None] & m_n[None, :], other=0.)
            b_dch += dot(b_dy.to(b_Ci.dtype), b_h.to(b_Ci.dtype), PRECISION)
        # exp(a_i) scales the rows of the product (fused into the sum here) rather than dy before it
        b_dc += b_g[:, None] * b_dch
        # dy_t . (what the carried state gives y_t): its gradient reaches every a_u, u <= t
        tl.store(dsum + o_a0 + o_i, b_g * tl.sum(b_dch * b_Ci.to(tl.float32), axis=1), mask=m_i)
    for i_j in range(0, i_i + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        m_j = t0 + o_j < T
        # padded rows too: their cumsum (0) could overflow the decay
        m_ij = (o_i[:, None] >= o_j[None, :]) & m_i[:, None] & m_j[None, :]
        # the decay factors through the column block's last step (used off the diagonal only)
        i_ref = tl.minimum(i_j * BT + BT - 1, i_last)
        if HAS_DOC:
            b_doc_j = tl.load(doc + o_d0 + o_j, mask=m_j, other=-2)
            m_ij = m_ij & (b_doc_i[:, None] == b_doc_j[None, :])
        b_B = tl.load(p_B0 + o_j[:, None] * s_Bt + o_n[None, :] * s_Bn, mask=m_j[:, None] & m_n[None, :], other=0.)
        # S_ij = C_i B_j^T again, in fp32: the stored S is bf16 for bf16 inputs, and its rounding,
        # summed into the decay gradient below, made dA ~1.5% off (0.5% this way)
        b_S = dot(b_Ci, tl.trans(b_B), PRECISION)
        i_pair = i_i * (i_i + 1) // 2 + i_j
        # [BT, BT] dS_ij summed over this split's heads
        b_ds = tl.zeros([BT, BT], dtype=tl.float32)
        for i_hh in range(HPS):
            i_h = i_h0 + i_hh
            o_a0 = (i_b * H + i_h).to(tl.int64) * T + t0
            # padded rows take the last real cumsum: finite decays (masked anyway)
            b_a_i = tl.load(dA_cs + o_a0 + o_i, mask=m_i, other=tl.load(dA_cs + o_a0 + i_last))
            b_a_j = tl.load(dA_cs + o_a0 + o_j, mask=m_j, other=0.)
            b_a_ref = tl.load(dA_cs + o_a0 + i_ref)
            b_l_i, b_l_j, b_l_ref = b_a_i, b_a_j, b_a_ref
            if PRECISE:
                b_l_i = tl.load(dA_lo + o_a0 + o_i, mask=m_i, other=0.)
                b_l_j = tl.load(dA_lo + o_a0 + o_j, mask=m_j, other=0.)
                b_l_ref = tl.load(dA_lo + o_a0 + i_ref)
            b_dt_j = tl.load(dtp + o_a0 + o_j, mask=m_j, other=0.)
            p_x0 = x + i_b.to(tl.int64) * s_xb + t0.to(tl.int64) * s_xt + i_h * s_xh
            p_o0 = dout + i_b.to(tl.int64) * s_ob + t0.to(tl.int64) * s_ot + i_h * s_oh
            p_z0 = z + i_b.to(tl.int64) * s_zb + t0.to(tl.int64) * s_zt + i_h * s_zh
            b_dyx = tl.zeros([BT, BT], dtype=tl.float32)
            for i_v in range(NV):
                o_v = i_v * BV + tl.arange(0, BV)
                m_v = o_v < P
                b_dy = load_dy(p_o0, p_z0, o_i, o_v, m_i[:, None] & m_v[None, :], s_ot, s_op, s_zt, s_zp, HAS_Z)
                # [BV, BT]: x_j^T, transposed by the pointers
                b_xt = tl.load(p_x0 + o_j[None, :] * s_xt + o_v[:, None] * s_xp,
                               mask=m_v[:, None] & m_j[None, :], other=0.)
                b_dyx += dot(b_dy.to(b_xt.dtype), b_xt, PRECISION)
            b_decay = decay_block(b_a_i, b_l_i, b_a_j, b_l_j, b_a_ref, b_l_ref, m_ij, i_j < i_i, False, PRECISE)
            b_gd = b_dyx * b_decay * b_dt_j[None, :]
            b_ds += b_gd
            # The gradient of the decays: da_u sums Q_ts over the pairs that
            # straddle u (s < u <= t). Summing rows minus columns instead
            # cancels large diagonal terms and amplifies rounding (~100x fp32,
            # useless in bf16), so the straddling sums are formed directly,
            # per block pair; ssd_ddt_bwd_kernel adds the pairs up.
            b_q = b_gd * b_S
            o_p = ((i_b * H + i_h).to(tl.int64) * NT + i_c) * NPAIR + i_pair
            o_r = o_p * BT + tl.arange(0, BT)
            if i_j < i_i:
                # to u in block i: all s straddle, rows t >= u; to u in block j: columns s < u
                tl.store(R_part + o_r, tl.cumsum(tl.sum(b_q, axis=1), axis=0, reverse=True))
                b_col = tl.sum(b_q, axis=0)
                tl.store(K_pair + o_r, tl.cumsum(b_col, axis=0) - b_col)
                # (blocks strictly between j and i get the whole sum)
                tl.store(T_pair + o_p, tl.sum(b_col, axis=0))
            else:
                if ROW_SCAN:
                    # F[t, s'] = sum_{s <= s'} Q[t, s] along each row (cheaper than along the columns in the dot's
                    # layout); sum_{t > s'} F[t, s'] is the straddling sum of u = s' + 1: stored one slot later
                    b_f = tl.cumsum(b_q, axis=1)
                    b_g = tl.sum(tl.where(o_i[:, None] > o_j[None, :], b_f, 0.), axis=0)
                    tl.store(R_part + o_r + 1, b_g, mask=tl.arange(0, BT) < BT - 1)
                    tl.store(R_part + o_p * BT, 0.)
                else:
                    # E[u, s] = sum_{t >= u} Q[t, s], summed over s < u
                    b_e = tl.cumsum(b_q, axis=0, reverse=True)
                    tl.store(R_part + o_r, tl.sum(tl.where(o_j[None, :] < o_i[:, None], b_e, 0.), axis=1))
                # (no K_pair or T_pair: ssd_ddt_bwd_kernel reads them for pairs off the diagonal only)
        b_ds = b_ds.to(b_B.dtype)
        tl.store(p_dS0 + o_i[:, None] * L + o_j[None, :], b_ds)
        b_dc += dot(b_ds, b_B, PRECISION)
    # (NSPLIT, batch, T, G, N): the final dtype if one split, else fp32 partials
    o_dc = ((i_sp * (BGt // G) + i_b).to(tl.int64) * T + t0 + o_i[:, None]) * (G * N) + i_g * N + o_n[None, :]
    tl.store(dC_out + o_dc, b_dc.to(dC_out.dtype.element_ty), mask=m_i[:, None] & m_n[None, :])


@autotune(
    configs=configs(
        # 4 warps spill at d_state 128 (fine for small states)
        [{"num_warps": 4, "num_stages": 1}, {"num_warps": 8, "num_stages": 1}, {"num_warps": 8, "num_stages": 2}],
        {"num_warps": 4},
        {"num_warps": 8, "num_stages": 1},
    ),
    key=["P", "N", "L", "BT", "BV", "HPS", "HAS_Z", "T_BUCKET"],
)
@triton.jit
def ssd_dx_bwd_kernel(
    x, dout, z, ypre, B, C, S, dS, D, dtp, dA_cs, dA_lo, doc, dstates,
    dx, dz, dB_out, ddt_x, vsum, dD_part,
    T, NT, T_BUCKET, BGt, s_xb, s_xt, s_xh, s_xp, s_ob, s_ot, s_oh, s_op, s_zb, s_zt, s_zh, s_zp,
    s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, L: tl.constexpr,
    BT: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, NSPLIT: tl.constexpr, HPS: tl.constexpr,
    HAS_D: tl.constexpr, D_2D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DOC: tl.constexpr,
    PRECISE: tl.constexpr, PRECISION: tl.constexpr,
):
    NB: tl.constexpr = L // BT
    NV: tl.constexpr = (P + BV - 1) // BV
    i_pid = tl.program_id(0)
    i_sp, i_r = i_pid % NSPLIT, i_pid // NSPLIT
    i_bg, i_ci = i_r % BGt, i_r // BGt
    i_c, i_j = i_ci // NB, i_ci % NB
    i_b, i_g = i_bg // G, i_bg % G
    t0 = i_c * L
    i_end = tl.minimum(t0 + L, T) - 1
    # blocks of the chunk that hold real steps
    NBv = (i_end - t0) // BT + 1
    o_j = i_j * BT + tl.arange(0, BT)
    o_n = tl.arange(0, BN)
    m_j, m_n = t0 + o_j < T, o_n < N
    m_jn = m_j[:, None] & m_n[None, :]
    o_d0 = i_b.to(tl.int64) * T + t0
    if HAS_DOC:
        b_doc_j = tl.load(doc + o_d0 + o_j, mask=m_j, other=-1)
        b_doc_end = tl.load(doc + o_d0 + (i_end - t0))
    p_B0 = B + i_b.to(tl.int64) * s_Bb + t0.to(tl.int64) * s_Bt + i_g * s_Bg
    p_C0 = C + i_b.to(tl.int64) * s_Cb + t0.to(tl.int64) * s_Ct + i_g * s_Cg
    p_S0 = S + (i_bg.to(tl.int64) * NT + i_c) * (L * L)
    p_dS0 = dS + (((i_sp * (BGt // G) + i_b) * G + i_g).to(tl.int64) * NT + i_c) * (L * L)
    # [BT, BN]
    b_db = tl.zeros([BT, BN], dtype=tl.float32)
    i_h0 = i_g * (H // G) + i_sp * HPS
    for i_hh in range(HPS):
        i_h = i_h0 + i_hh
        i_bh = i_b * H + i_h
        o_a0 = i_bh.to(tl.int64) * T + t0
        b_a_j = tl.load(dA_cs + o_a0 + o_j, mask=m_j, other=0.)
        b_dt_j = tl.load(dtp + o_a0 + o_j, mask=m_j, other=0.)
        b_a_end = tl.load(dA_cs + o_a0 + (i_end - t0))
        b_seg = b_a_end - b_a_j
        # the decay factors through this block's last step (used off the diagonal only)
        b_a_ref = tl.load(dA_cs + o_a0 + tl.minimum(i_j * BT + BT - 1, i_end - t0))
        b_l_j, b_l_ref = b_a_j, b_a_ref
        if PRECISE:
            b_l_j = tl.load(dA_lo + o_a0 + o_j, mask=m_j, other=0.)
            b_l_ref = tl.load(dA_lo + o_a0 + tl.minimum(i_j * BT + BT - 1, i_end - t0))
            b_seg += tl.load(dA_lo + o_a0 + (i_end - t0)) - b_l_j
        # decay of step s to the chunk end (its weight in the state passed on)
        b_r = tl.where(m_j, tl.exp(b_seg), 0.)
        if HAS_DOC:
            b_r = tl.where(b_doc_j == b_doc_end, b_r, 0.)
        p_x0 = x + i_b.to(tl.int64) * s_xb + t0.to(tl.int64) * s_xt + i_h * s_xh
        p_o0 = dout + i_b.to(tl.int64) * s_ob + t0.to(tl.int64) * s_ot + i_h * s_oh
        p_z0 = z + i_b.to(tl.int64) * s_zb + t0.to(tl.int64) * s_zt + i_h * s_zh
        p_dh0 = dstates + (i_bh.to(tl.int64) * NT + i_c) * (P * N)
        # contiguous (batch, T, heads, P) outputs
        o_out0 = ((i_b.to(tl.int64) * T + t0 + o_j[:, None]) * H + i_h) * P
        b_ddt = tl.zeros([BT], dtype=tl.float32)
        b_v = tl.zeros([BT], dtype=tl.float32)
        for i_v in range(NV):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < P
            m_jv = m_j[:, None] & m_v[None, :]
            m_vn = m_v[:, None] & m_n[None, :]
            # (tiles are loaded where they are used, to keep few of them live at once)
            b_B = tl.load(p_B0 + o_j[:, None] * s_Bt + o_n[None, :] * s_Bn, mask=m_jn, other=0.)
            # [BN, BV] dh^T, transposed by the pointers
            # (states are tensor-core operands: rounded once, at the load)
            b_dht = tl.load(p_dh0 + o_n[:, None] + o_v[None, :] * N, mask=m_n[:, None] & m_v[None, :],
                            other=0.).to(b_B.dtype)
            # [BT, BV] gradient of u = dt x through the state passed on: r B_j dh^T
            b_du = dot((b_B * b_r[:, None]).to(b_B.dtype), b_dht, PRECISION)
            p_xj = p_x0 + o_j[:, None] * s_xt + o_v[None, :] * s_xp
            b_v += b_dt_j * tl.sum(tl.load(p_xj, mask=m_jv, other=0.).to(tl.float32) * b_du, axis=1)
            # ... and through the outputs of later steps in the chunk: W_ij^T dy_i
            for i_i in range(i_j, NBv):
                o_i = i_i * BT + tl.arange(0, BT)
                m_i = t0 + o_i < T
                # padded rows take the last real cumsum: finite decays (masked anyway)
                b_a_i = tl.load(dA_cs + o_a0 + o_i, mask=m_i, other=b_a_end)
                b_l_i = b_a_i
                if PRECISE:
                    b_l_i = tl.load(dA_lo + o_a0 + o_i, mask=m_i, other=0.)
                m_ji = (o_i[None, :] >= o_j[:, None]) & m_i[None, :] & m_j[:, None]
                if HAS_DOC:
                    b_doc_i = tl.load(doc + o_d0 + o_i, mask=m_i, other=-2)
                    m_ji = m_ji & (b_doc_j[:, None] == b_doc_i[None, :])
                # [BT(j), BT(i)]: S_ij^T, transposed by the pointers
                b_St = tl.load(p_S0 + o_i[None, :] * L + o_j[:, None]).to(tl.float32)
                b_Wt = b_St * decay_block(b_a_i, b_l_i, b_a_j, b_l_j, b_a_ref, b_l_ref, m_ji, i_j < i_i, True,
                                          PRECISE)
                b_dyi = load_dy(p_o0, p_z0, o_i, o_v, m_i[:, None] & m_v[None, :], s_ot, s_op, s_zt, s_zp, HAS_Z)
                b_du += dot(b_Wt.to(b_B.dtype), b_dyi.to(b_B.dtype), PRECISION)
            b_xf = tl.load(p_xj, mask=m_jv, other=0.).to(tl.float32)
            b_do = tl.load(p_o0 + o_j[:, None] * s_ot + o_v[None, :] * s_op, mask=m_jv, other=0.).to(tl.float32)
            b_dy = b_do
            if HAS_Z:
                b_z = tl.load(p_z0 + o_j[:, None] * s_zt + o_v[None, :] * s_zp, mask=m_jv, other=0.).to(tl.float32)
                b_sig = tl.sigmoid(b_z)
                b_dy = b_do * b_z * b_sig
                b_yp = tl.load(ypre + o_out0 + o_v[None, :], mask=m_jv, other=0.).to(tl.float32)
                b_dz = b_do * b_yp * b_sig * (1. + b_z * (1. - b_sig))
                tl.store(dz + o_out0 + o_v[None, :], b_dz.to(dz.dtype.element_ty), mask=m_jv)
            b_dx = b_dt_j[:, None] * b_du
            if HAS_D:
                if D_2D:
                    b_D = tl.load(D + i_h * P + o_v, mask=m_v, other=0.).to(tl.float32)[None, :]
                else:
                    b_D = tl.load(D + i_h).to(tl.float32)
                b_dx += b_D * b_dy
                tl.store(dD_part + ((i_b * NT + i_c) * NB + i_j).to(tl.int64) * (H * P) + i_h * P + o_v,
                         tl.sum(b_dy * b_xf, axis=0), mask=m_v)
            tl.store(dx + o_out0 + o_v[None, :], b_dx.to(dx.dtype.element_ty), mask=m_jv)
            b_ddt += tl.sum(b_xf * b_du, axis=1)
            # summed over heads: dB_j += (r dt x_j) dh, [BV, BN]
            b_dh = tl.load(p_dh0 + o_v[:, None] * N + o_n[None, :], mask=m_vn, other=0.).to(b_B.dtype)
            b_xr = (b_xf * (b_dt_j * b_r)[:, None]).to(b_B.dtype)
            b_db += dot(b_xr, b_dh, PRECISION)
        # per step: d(loss)/d(dt') through u = dt' x, and v_s = <dh, r_s u_s B_s^T>, the
        # gradient of the decays of the steps after s through the state passed on
        tl.store(ddt_x + o_a0 + o_j, b_ddt, mask=m_j)
        tl.store(vsum + o_a0 + o_j, b_v, mask=m_j)

    # dB_j += sum_i dS_ij^T C_i
    for i_i in range(i_j, NBv):
        o_i = i_i * BT + tl.arange(0, BT)
        m_i = t0 + o_i < T
        b_dSt = tl.load(p_dS0 + o_i[None, :] * L + o_j[:, None])
        b_C = tl.load(p_C0 + o_i[:, None] * s_Ct + o_n[None, :] * s_Cn, mask=m_i[:, None] & m_n[None, :], other=0.)
        b_db += dot(b_dSt, b_C, PRECISION)
    # (NSPLIT, batch, T, G, N)
    o_bn = ((i_sp * (BGt // G) + i_b).to(tl.int64) * T + t0 + o_j[:, None]) * (G * N) + i_g * N + o_n[None, :]
    tl.store(dB_out + o_bn, b_db.to(dB_out.dtype.element_ty), mask=m_jn)


@autotune(
    configs=configs(
        # num_stages > 1: the head loop is the innermost loop here, so the pipeliner fetches the next heads' tiles.
        # 4 warps spill at d_state 128 (offline ~200 B, ~100 B since b28bb5d) but fit two programs per SM: they
        # win (16.2 -> 11.2 ms at 1M on an H100); 8 warps capped at 128 registers (two per SM, ~500 B of spills)
        # lost (benchmarks/ssd_maxnreg_h100.json, sass_counts_scalings_offline.json)
        [{"num_warps": w, "num_stages": s} for w in (4, 8) for s in (1, 2, 3)],
        {"num_warps": 4},
        {"num_warps": 8, "num_stages": 2},
    ),
    key=["P", "N", "L", "HPS", "HAS_Z", "T_BUCKET"],
)
@triton.jit
def ssd_dx_one_block_bwd_kernel(
    x, dout, z, ypre, B, C, S, dS, D, dtp, dA_cs, dA_lo, doc, dstates,
    dx, dz, dB_out, ddt_x, vsum, dD_part,
    T, NT, T_BUCKET, BGt, s_xb, s_xt, s_xh, s_xp, s_ob, s_ot, s_oh, s_op, s_zb, s_zt, s_zh, s_zp,
    s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, L: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, NSPLIT: tl.constexpr, HPS: tl.constexpr,
    HAS_D: tl.constexpr, D_2D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DOC: tl.constexpr,
    PRECISE: tl.constexpr, PRECISION: tl.constexpr,
):
    """``ssd_dx_bwd_kernel`` for chunks of one time block (L = BT) and one head-dimension tile (P <= BV).

    The chunk is the diagonal block alone, so the head loop is the innermost loop: x, dout, z and the state
    gradient are loaded once per head (the general kernel loads each of them twice; the
    transpose is taken in registers here), and with num_stages > 1 Triton's pipeliner fetches the next head's
    tiles while this one computes (offline sm_90a compile, scripts/sass_report.py --op ssd --kernel dx1: global
    loads in the loop 32 -> 5 at 2 stages; no spills at 8 warps, ~100 B at the 4 warps the autotuner picks at
    d_state 128, which hold two programs per SM). Results as
    ``ssd_dx_bwd_kernel``'s; MAMBATRAIN_SSD_ONE_BLOCK_BWD=0 takes the general kernel instead.
    """
    i_pid = tl.program_id(0)
    i_sp, i_r = i_pid % NSPLIT, i_pid // NSPLIT
    i_bg, i_c = i_r % BGt, i_r // BGt
    i_b, i_g = i_bg // G, i_bg % G
    t0 = i_c * L
    i_end = tl.minimum(t0 + L, T) - 1
    o_j = tl.arange(0, L)
    o_n = tl.arange(0, BN)
    o_v = tl.arange(0, BV)
    m_j, m_n, m_v = t0 + o_j < T, o_n < N, o_v < P
    m_jn = m_j[:, None] & m_n[None, :]
    m_jv = m_j[:, None] & m_v[None, :]
    o_d0 = i_b.to(tl.int64) * T + t0
    # [L(j), L(i)]: pairs i >= j of real steps, of one document
    m_ji = (o_j[None, :] >= o_j[:, None]) & m_j[None, :] & m_j[:, None]
    if HAS_DOC:
        b_doc_j = tl.load(doc + o_d0 + o_j, mask=m_j, other=-1)
        b_doc_end = tl.load(doc + o_d0 + (i_end - t0))
        m_ji = m_ji & (b_doc_j[:, None] == b_doc_j[None, :])
    p_B0 = B + i_b.to(tl.int64) * s_Bb + t0.to(tl.int64) * s_Bt + i_g * s_Bg
    p_C0 = C + i_b.to(tl.int64) * s_Cb + t0.to(tl.int64) * s_Ct + i_g * s_Cg
    p_S0 = S + (i_bg.to(tl.int64) * NT + i_c) * (L * L)
    p_dS0 = dS + (((i_sp * (BGt // G) + i_b) * G + i_g).to(tl.int64) * NT + i_c) * (L * L)
    b_db = tl.zeros([L, BN], dtype=tl.float32)
    i_h0 = i_g * (H // G) + i_sp * HPS
    for i_hh in range(HPS):
        i_h = i_h0 + i_hh
        i_bh = i_b * H + i_h
        o_a0 = i_bh.to(tl.int64) * T + t0
        b_a_j = tl.load(dA_cs + o_a0 + o_j, mask=m_j, other=0.)
        b_dt_j = tl.load(dtp + o_a0 + o_j, mask=m_j, other=0.)
        b_seg = tl.load(dA_cs + o_a0 + (i_end - t0)) - b_a_j
        b_l_j = b_a_j
        if PRECISE:
            b_l_j = tl.load(dA_lo + o_a0 + o_j, mask=m_j, other=0.)
            b_seg += tl.load(dA_lo + o_a0 + (i_end - t0)) - b_l_j
        # decay of step s to the chunk end (its weight in the state passed on)
        b_r = tl.where(m_j, tl.exp(b_seg), 0.)
        if HAS_DOC:
            b_r = tl.where(b_doc_j == b_doc_end, b_r, 0.)
        o_x = x + i_b.to(tl.int64) * s_xb + (t0 + o_j[:, None]).to(tl.int64) * s_xt + i_h * s_xh + o_v[None, :] * s_xp
        o_o = dout + i_b.to(tl.int64) * s_ob + (t0 + o_j[:, None]).to(tl.int64) * s_ot + i_h * s_oh \
            + o_v[None, :] * s_op
        o_out = ((i_b.to(tl.int64) * T + t0 + o_j[:, None]) * H + i_h) * P + o_v[None, :]
        p_dh0 = dstates + (i_bh.to(tl.int64) * NT + i_c) * (P * N)
        # [BN, BV] dh^T, transposed by the pointers (a tensor-core operand: rounded once, at the load)
        b_dht = tl.load(p_dh0 + o_n[:, None] + o_v[None, :] * N, mask=m_n[:, None] & m_v[None, :],
                        other=0.).to(B.dtype.element_ty)
        b_xf = tl.load(o_x, mask=m_jv, other=0.).to(tl.float32)
        b_do = tl.load(o_o, mask=m_jv, other=0.).to(tl.float32)
        b_dy = b_do
        if HAS_Z:
            o_z = z + i_b.to(tl.int64) * s_zb + (t0 + o_j[:, None]).to(tl.int64) * s_zt + i_h * s_zh \
                + o_v[None, :] * s_zp
            b_z = tl.load(o_z, mask=m_jv, other=0.).to(tl.float32)
            b_sig = tl.sigmoid(b_z)
            b_dy = b_do * b_z * b_sig
            b_yp = tl.load(ypre + o_out, mask=m_jv, other=0.).to(tl.float32)
            tl.store(dz + o_out, (b_do * b_yp * b_sig * (1. + b_z * (1. - b_sig))).to(dz.dtype.element_ty),
                     mask=m_jv)
        b_B = tl.load(p_B0 + o_j[:, None] * s_Bt + o_n[None, :] * s_Bn, mask=m_jn, other=0.)
        # [L, BV] gradient of u = dt x through the state passed on: r B_j dh^T (r applied to the product, in
        # fp32: B goes to the tensor cores as loaded; with K_part gone too, offline 1,633 -> 1,345 instructions a
        # head at 4 warps and 11.2 -> 9.6 ms at 1M on an H100), ...
        b_du = b_r[:, None] * dot(b_B, b_dht, PRECISION)
        b_v = b_dt_j * tl.sum(b_xf * b_du, axis=1)
        # ... and through the outputs of later steps in the chunk: W^T dy
        # S_ij^T, transposed by the pointers. B and S are the group's, reloaded per head (from L1/L2): held over
        # the loop they cost registers (spills at every config offline)
        b_St = tl.load(p_S0 + o_j[None, :] * L + o_j[:, None])
        b_Wt = b_St.to(tl.float32) * decay_block(b_a_j, b_l_j, b_a_j, b_l_j, b_a_j, b_l_j, m_ji, False, True, PRECISE)
        b_du += dot(b_Wt.to(B.dtype.element_ty), b_dy.to(B.dtype.element_ty), PRECISION)
        b_dx = b_dt_j[:, None] * b_du
        if HAS_D:
            if D_2D:
                b_D = tl.load(D + i_h * P + o_v, mask=m_v, other=0.).to(tl.float32)[None, :]
            else:
                b_D = tl.load(D + i_h).to(tl.float32)
            b_dx += b_D * b_dy
            tl.store(dD_part + (i_b * NT + i_c).to(tl.int64) * (H * P) + i_h * P + o_v,
                     tl.sum(b_dy * b_xf, axis=0), mask=m_v)
        tl.store(dx + o_out, b_dx.to(dx.dtype.element_ty), mask=m_jv)
        # per step: d(loss)/d(dt') through u = dt' x, and v_s (see ssd_dx_bwd_kernel)
        tl.store(ddt_x + o_a0 + o_j, tl.sum(b_xf * b_du, axis=1), mask=m_j)
        tl.store(vsum + o_a0 + o_j, b_v, mask=m_j)
        # summed over heads: dB_j += (r dt x_j) dh, [BV, BN]
        b_xr = (b_xf * (b_dt_j * b_r)[:, None]).to(B.dtype.element_ty)
        b_db += dot(b_xr, tl.trans(b_dht), PRECISION)
    # dB_j += sum_i dS_ij^T C_i
    b_dSt = tl.load(p_dS0 + o_j[None, :] * L + o_j[:, None])
    b_C = tl.load(p_C0 + o_j[:, None] * s_Ct + o_n[None, :] * s_Cn, mask=m_jn, other=0.)
    b_db += dot(b_dSt, b_C, PRECISION)
    o_bn = ((i_sp * (BGt // G) + i_b).to(tl.int64) * T + t0 + o_j[:, None]) * (G * N) + i_g * N + o_n[None, :]
    tl.store(dB_out + o_bn, b_db.to(dB_out.dtype.element_ty), mask=m_jn)


@triton.jit
def ssd_ddt_bwd_kernel(
    dt, A, dt_bias, dtp, ddt_x, dsum, vsum, Kc_part, R_part, K_pair, T_pair, ddt, dA_part, dbias_part,
    T, NT, s_db, s_dt, s_dh,
    H: tl.constexpr, L: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, KC_TILES: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    NB: tl.constexpr = L // BT
    NPAIR: tl.constexpr = NB * (NB + 1) // 2
    i_c, i_b, i_hb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_h = i_hb * BH + tl.arange(0, BH)
    m_h = o_h < H
    o_bh = (i_b * H + o_h).to(tl.int64)
    o_pair = (o_bh * NT + i_c) * NPAIR
    b_A = tl.load(A + o_h, mask=m_h, other=0.).to(tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(dt_bias + o_h, mask=m_h, other=0.).to(tl.float32)
    # [BH] <dh, h> at the chunk end (sum v + <dh, h_prev> exp(a_end)): reaches every step. The sum of v is taken
    # here rather than in the dx kernels: there it was a reduction across warps (a barrier) per head and block
    b_k = tl.zeros([BH], dtype=tl.float32)
    for i_j in tl.static_range(NB):
        o_t = i_c * L + i_j * BT + tl.arange(0, BT)
        m = (o_t < T)[:, None] & m_h[None, :]
        b_k += tl.sum(tl.load(vsum + o_bh[None, :] * T + o_t[:, None], mask=m, other=0.), axis=0)
    for i_j in range(KC_TILES):
        b_k += tl.load(Kc_part + (o_bh * NT + i_c) * KC_TILES + i_j, mask=m_h, other=0.)
    b_carry = tl.zeros([BH], dtype=tl.float32)
    b_dA = tl.zeros([BH], dtype=tl.float32)
    b_db = tl.zeros([BH], dtype=tl.float32)
    # blocks last to first: the suffix sums of dsum carry over
    for i_k in tl.static_range(NB - 1, -1, -1):
        o_l = tl.arange(0, BT)
        o_t = i_c * L + i_k * BT + o_l
        m = (o_t < T)[:, None] & m_h[None, :]
        # [BT, BH]
        o_a = o_bh[None, :] * T + o_t[:, None]
        # revcumsum(q - v) + sum(v) = sum of q after u + sum of v before u
        b_ds = tl.load(dsum + o_a, mask=m, other=0.) - tl.load(vsum + o_a, mask=m, other=0.)
        b_da = tl.cumsum(b_ds, axis=0, reverse=True) + (b_carry + b_k)[None, :]
        b_carry += tl.sum(b_ds, axis=0)
        # straddling pairs of the quadratic form: rows in this block, ...
        for i_j in tl.static_range(i_k + 1):
            b_da += tl.load(R_part + (o_pair + i_k * (i_k + 1) // 2 + i_j)[None, :] * BT + o_l[:, None],
                            mask=m, other=0.)
        for i_i in tl.static_range(i_k + 1, NB):
            # ... columns in this block, ...
            b_da += tl.load(K_pair + (o_pair + i_i * (i_i + 1) // 2 + i_k)[None, :] * BT + o_l[:, None],
                            mask=m, other=0.)
            # ... or rows after it and columns before it
            for i_j in tl.static_range(i_k):
                b_da += tl.load(T_pair + o_pair + i_i * (i_i + 1) // 2 + i_j, mask=m_h, other=0.)[None, :]
        b_da = tl.where(m, b_da, 0.)
        b_dtp = tl.load(dtp + o_a, mask=m, other=0.)
        b_ddt = tl.load(ddt_x + o_a, mask=m, other=0.) + b_A[None, :] * b_da
        b_dA += tl.sum(b_dtp * b_da, axis=0)
        if SOFTPLUS:
            p_dt = dt + i_b.to(tl.int64) * s_db + o_t[:, None].to(tl.int64) * s_dt + o_h[None, :] * s_dh
            b_raw = tl.load(p_dt, mask=m, other=0.).to(tl.float32)
            if HAS_BIAS:
                b_raw += b_bias[None, :]
            b_ddt = b_ddt * tl.sigmoid(b_raw)
        b_ddt = tl.where(m, b_ddt, 0.)
        b_db += tl.sum(b_ddt, axis=0)
        # contiguous (batch, T, heads)
        tl.store(ddt + (i_b.to(tl.int64) * T + o_t[:, None]) * H + o_h[None, :], b_ddt.to(ddt.dtype.element_ty),
                 mask=m)
    tl.store(dA_part + (i_b * NT + i_c).to(tl.int64) * H + o_h, b_dA, mask=m_h)
    if HAS_BIAS:
        tl.store(dbias_part + (i_b * NT + i_c).to(tl.int64) * H + o_h, b_db, mask=m_h)
