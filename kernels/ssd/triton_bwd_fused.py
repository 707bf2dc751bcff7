"""The intra-chunk backward of the SSD scan in one kernel, for chunks of a single time block (chunk 64 at d_state
up to 128): ``ssd_dcb_bwd_kernel`` and ``ssd_dx_bwd_kernel`` (triton_bwd.py) fused.

Experimental, off by default (``MAMBATRAIN_SSD_FUSED_BWD=1`` turns it on) until a GPU has measured it against the
pair. The pair reads dout, z and x twice, recomputes or reloads S = C B^T per head, and passes dS between them
through memory; at chunk 64 and 1M tokens they take 33 of the scan's 60 ms on an H100, ~2.4x the bytes they must
move (README.md, "Where the time goes"). Here one program per (chunk, group, split of heads) reads each of
those once: S once per chunk, in fp32; per head one pass over the head dimension does both kernels' work; dS is
summed over the heads in registers and used for dB and dC at the end. Outputs, buffers and their layouts are
those of the pair (with one time block, block pair 0 only), so ``ssd_ddt_bwd_kernel`` follows unchanged.
"""

import triton
import triton.language as tl

from ..settings import configs
from .triton_fwd import decay_block, dot


@triton.autotune(
    configs=configs(
        # BV: the slice of the head dimension per step (the kernel holds both kernels' tiles at once)
        [{"BV": bv, "num_warps": w, "num_stages": s} for bv in (16, 32) for w in (8, 16) for s in (1, 2)],
        {"BV": 16, "num_warps": 4},
        {"BV": 32, "num_warps": 8, "num_stages": 1},
    ),
    key=["P", "N", "L", "HPS", "HAS_Z", "T_BUCKET"],
)
@triton.jit
def ssd_chunk_bwd_kernel(
    x, dout, z, ypre, B, C, D, dtp, dA_cs, dA_lo, doc, states, dstates,
    dx, dz, dB_out, dC_out, ddt_x, vsum, dsum, K_part, R_part, K_pair, T_pair, dD_part,
    T, NT, T_BUCKET, BGt, s_xb, s_xt, s_xh, s_xp, s_ob, s_ot, s_oh, s_op, s_zb, s_zt, s_zh, s_zp,
    s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, L: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, NSPLIT: tl.constexpr, HPS: tl.constexpr,
    HAS_D: tl.constexpr, D_2D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DOC: tl.constexpr,
    PRECISE: tl.constexpr, PRECISION: tl.constexpr,
):
    NV: tl.constexpr = (P + BV - 1) // BV
    i_pid = tl.program_id(0)
    i_sp, i_r = i_pid % NSPLIT, i_pid // NSPLIT
    i_bg, i_c = i_r % BGt, i_r // BGt
    i_b, i_g = i_bg // G, i_bg % G
    t0 = i_c * L
    i_last = tl.minimum(L, T - t0) - 1
    o_t = tl.arange(0, L)
    o_n = tl.arange(0, BN)
    m_t, m_n = t0 + o_t < T, o_n < N
    m_tn = m_t[:, None] & m_n[None, :]
    # [L, L] pairs (t, s) with s <= t, real steps only
    m_ts = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    o_d0 = i_b.to(tl.int64) * T + t0
    if HAS_DOC:
        b_doc = tl.load(doc + o_d0 + o_t, mask=m_t, other=-1)
        b_doc_prev = tl.load(doc + i_b.to(tl.int64) * T + tl.maximum(t0 - 1, 0))
        b_doc_end = tl.load(doc + o_d0 + i_last)
        m_ts = m_ts & (b_doc[:, None] == b_doc[None, :])
    # [L, BN] pointers of B and C: the tiles are loaded where they are used (L2 hits after the first head), not
    # held over the head loop, which would keep them in several register layouts at once
    p_B = B + i_b.to(tl.int64) * s_Bb + t0.to(tl.int64) * s_Bt + i_g * s_Bg + o_t[:, None] * s_Bt + o_n[None, :] * s_Bn
    p_C = C + i_b.to(tl.int64) * s_Cb + t0.to(tl.int64) * s_Ct + i_g * s_Cg + o_t[:, None] * s_Ct + o_n[None, :] * s_Cn
    b_dc = tl.zeros([L, BN], dtype=tl.float32)
    b_db = tl.zeros([L, BN], dtype=tl.float32)
    b_ds = tl.zeros([L, L], dtype=tl.float32)
    i_h0 = i_g * (H // G) + i_sp * HPS
    for i_hh in range(HPS):
        i_h = i_h0 + i_hh
        i_bh = i_b * H + i_h
        o_a0 = i_bh.to(tl.int64) * T + t0
        # padded steps take the last real cumsum: finite decays (masked anyway)
        b_a_end = tl.load(dA_cs + o_a0 + i_last)
        b_a = tl.load(dA_cs + o_a0 + o_t, mask=m_t, other=b_a_end)
        b_l, b_l_end = b_a, b_a_end
        b_seg = b_a_end - b_a
        if PRECISE:
            b_l = tl.load(dA_lo + o_a0 + o_t, mask=m_t, other=0.)
            b_l_end = tl.load(dA_lo + o_a0 + i_last)
            b_seg += b_l_end - b_l
        b_dt = tl.load(dtp + o_a0 + o_t, mask=m_t, other=0.)
        # decay from the state entering the chunk to step t, and from step s to the chunk end
        b_g = tl.where(m_t, tl.exp(b_a), 0.)
        b_r = tl.where(m_t, tl.exp(b_seg), 0.)
        if HAS_DOC:
            b_g = tl.where(b_doc == b_doc_prev, b_g, 0.)
            b_r = tl.where(b_doc == b_doc_end, b_r, 0.)
        # [L, L] S = C B^T in fp32, again per head (fewer registers held over the head loop; the forward's bf16 S
        # made bf16 dA ~1.5% off, see ssd_dcb_bwd_kernel)
        b_B = tl.load(p_B, mask=m_tn, other=0.)
        b_C = tl.load(p_C, mask=m_tn, other=0.)
        b_S = dot(b_C, tl.trans(b_B), PRECISION)
        # [L(t), L(s)] exp(a_t - a_s) on the causal, same-document pairs; W = S * decay
        b_decay = decay_block(b_a, b_l, b_a, b_l, b_a_end, b_l_end, m_ts, False, False, PRECISE)
        b_Wt = tl.trans(b_S * b_decay).to(b_B.dtype)
        p_x0 = x + i_b.to(tl.int64) * s_xb + t0.to(tl.int64) * s_xt + i_h * s_xh
        p_o0 = dout + i_b.to(tl.int64) * s_ob + t0.to(tl.int64) * s_ot + i_h * s_oh
        p_z0 = z + i_b.to(tl.int64) * s_zb + t0.to(tl.int64) * s_zt + i_h * s_zh
        p_h0 = states + (i_bh.to(tl.int64) * NT + i_c) * (P * N)
        p_dh0 = dstates + (i_bh.to(tl.int64) * NT + i_c) * (P * N)
        # contiguous (batch, T, heads, P) outputs
        o_out0 = ((i_b.to(tl.int64) * T + t0 + o_t[:, None]) * H + i_h) * P
        b_dsum = tl.zeros([L], dtype=tl.float32)
        b_dyx = tl.zeros([L, L], dtype=tl.float32)
        b_ddt = tl.zeros([L], dtype=tl.float32)
        b_v = tl.zeros([L], dtype=tl.float32)
        for i_v in range(NV):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < P
            m_tv = m_t[:, None] & m_v[None, :]
            m_vn = m_v[:, None] & m_n[None, :]
            # [L, BV] dy = dout * silu(z), and the inputs of this slice of the head
            b_do = tl.load(p_o0 + o_t[:, None] * s_ot + o_v[None, :] * s_op, mask=m_tv, other=0.).to(tl.float32)
            b_dy = b_do
            if HAS_Z:
                b_z = tl.load(p_z0 + o_t[:, None] * s_zt + o_v[None, :] * s_zp, mask=m_tv, other=0.).to(tl.float32)
                b_sig = tl.sigmoid(b_z)
                b_dy = b_do * b_z * b_sig
                b_yp = tl.load(ypre + o_out0 + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
                b_dz = b_do * b_yp * b_sig * (1. + b_z * (1. - b_sig))
                tl.store(dz + o_out0 + o_v[None, :], b_dz.to(dz.dtype.element_ty), mask=m_tv)
            b_x = tl.load(p_x0 + o_t[:, None] * s_xt + o_v[None, :] * s_xp, mask=m_tv, other=0.)
            b_xf = b_x.to(tl.float32)
            b_dyc = b_dy.to(b_B.dtype)
            # dC through the carried state, summed over heads: (exp(a_t) dy_t) h_prev, [BV, BN] states; and
            # dy_t . (what the carried state gives y_t) = sum_v (exp(a_t) dy_t)_v (C_t h_prev^T)_v, whose gradient
            # reaches every a_u, u <= t (as C h^T: no [L, BN] per-head sum is kept)
            b_h = tl.load(p_h0 + o_v[:, None] * N + o_n[None, :], mask=m_vn, other=0.).to(b_B.dtype)
            b_dyg = b_dy * b_g[:, None]
            b_dc += dot(b_dyg.to(b_B.dtype), b_h, PRECISION)
            b_dsum += tl.sum(b_dyg * dot(b_C, tl.trans(b_h), PRECISION), axis=1)
            # dy_t . x_s, summed over the head dimension
            b_dyx += dot(b_dy.to(b_x.dtype), tl.trans(b_x), PRECISION)
            # [BV, BN] the gradient of the state leaving the chunk (states are tensor-core operands)
            b_dh = tl.load(p_dh0 + o_v[:, None] * N + o_n[None, :], mask=m_vn, other=0.).to(b_B.dtype)
            # du_s through the state passed on (r_s B_s dh^T), then through later outputs (W^T dy)
            b_du = dot((b_B * b_r[:, None]).to(b_B.dtype), tl.trans(b_dh), PRECISION)
            b_v += b_dt * tl.sum(b_xf * b_du, axis=1)
            b_du += dot(b_Wt, b_dyc, PRECISION)
            b_dxv = b_dt[:, None] * b_du
            if HAS_D:
                if D_2D:
                    b_D = tl.load(D + i_h * P + o_v, mask=m_v, other=0.).to(tl.float32)[None, :]
                else:
                    b_D = tl.load(D + i_h).to(tl.float32)
                b_dxv += b_D * b_dy
                tl.store(dD_part + (i_b * NT + i_c).to(tl.int64) * (H * P) + i_h * P + o_v,
                         tl.sum(b_dy * b_xf, axis=0), mask=m_v)
            tl.store(dx + o_out0 + o_v[None, :], b_dxv.to(dx.dtype.element_ty), mask=m_tv)
            b_ddt += tl.sum(b_xf * b_du, axis=1)
            # dB through the state passed on, summed over heads: (r dt x) dh
            b_db += dot((b_xf * (b_dt * b_r)[:, None]).to(b_B.dtype), b_dh, PRECISION)
        tl.store(dsum + o_a0 + o_t, b_dsum, mask=m_t)
        tl.store(ddt_x + o_a0 + o_t, b_ddt, mask=m_t)
        tl.store(vsum + o_a0 + o_t, b_v, mask=m_t)
        tl.store(K_part + i_bh.to(tl.int64) * NT + i_c, tl.sum(b_v, axis=0))
        # dS over this head, and the straddling sums of the decay gradient (one block: the diagonal pair)
        b_gd = b_dyx * b_decay * b_dt[None, :]
        b_ds += b_gd
        b_q = b_gd * b_S
        b_e = tl.cumsum(b_q, axis=0, reverse=True)
        b_rv = tl.sum(tl.where(o_t[None, :] < o_t[:, None], b_e, 0.), axis=1)
        o_p = i_bh.to(tl.int64) * NT + i_c
        tl.store(R_part + o_p * L + o_t, b_rv)
        tl.store(K_pair + o_p * L + o_t, tl.zeros([L], dtype=tl.float32))
        tl.store(T_pair + o_p, tl.sum(tl.sum(b_q, axis=0), axis=0))
    # dC_t += sum_s dS_ts B_s, dB_s += sum_t dS_ts C_t (dS rounded as the pair stores it)
    b_B = tl.load(p_B, mask=m_tn, other=0.)
    b_C = tl.load(p_C, mask=m_tn, other=0.)
    b_dsc = b_ds.to(b_B.dtype)
    b_dc += dot(b_dsc, b_B, PRECISION)
    b_db += dot(tl.trans(b_dsc), b_C, PRECISION)
    # (NSPLIT, batch, T, G, N): the final dtype if one split, else fp32 partials
    o_out = ((i_sp * (BGt // G) + i_b).to(tl.int64) * T + t0 + o_t[:, None]) * (G * N) + i_g * N + o_n[None, :]
    tl.store(dC_out + o_out, b_dc.to(dC_out.dtype.element_ty), mask=m_tn)
    tl.store(dB_out + o_out, b_db.to(dB_out.dtype.element_ty), mask=m_tn)
