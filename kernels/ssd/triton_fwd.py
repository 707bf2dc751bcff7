"""Forward kernels of the chunked SSD scan (see README.md for the maths).

Four launches, one kernel each:

1. ``ssd_chunk_cumsum_fwd_kernel``: dt -> dt' = softplus(dt + bias), and the
   cumulative sum of dt' * A inside each chunk, both fp32 in (batch, heads, T).
2. ``ssd_bmm_fwd_kernel``: S = C B^T for each chunk and group, the blocks on and
   below the diagonal; shared by all heads of the group, so computed once.
3. ``ssd_state_fwd_kernel``: the state entering each chunk, fp32. One program
   per (state tile, batch*head) walks the chunks in order: it computes the
   chunk's own state (one matmul over the chunk) and passes the carried one on.
   This fuses "chunk states" and "state passing" so no chunk-local state ever
   reaches memory.
4. ``ssd_output_fwd_kernel``: per (chunk, head): for each row block, C h_prev
   plus the masked quadratic form over the chunk, the D skip and the silu(z) gate.

Chunks of one time block take ``ssd_output_one_block_fwd_kernel`` for 4; when a whole state also fits one
program, ``ssd_state_output_fwd_kernel`` does 3's last pass and 4 in one walk (``triton.py``'s switches).

Vocabulary as in flash-linear-attention: ``i_`` program ids, ``o_`` offsets,
``m_`` masks, ``p_`` pointers, ``b_`` block values. Offsets that scale with
the length (batch, time) are int64; offsets inside a chunk stay int32.
"""

import triton
import triton.language as tl

from ..settings import INTERPRET, autotune, configs

# Triton's interpreter multiplies the raw bits of bf16 operands in tl.dot
# (3.7.1); there, and only there, upcast: bf16 products are exact in fp32
# and the GPU accumulates in fp32 too, so the result is the same.
DOT_UPCAST = tl.constexpr(INTERPRET)

# State tiles of a whole 128-wide d_state row (both state kernels' spaces): a program reads its chunk's x (dout)
# once rather than once per 64-wide tile, and its loop has ~20% fewer instructions per state element at 8 warps
# (sm_90 offline, pass 3: forward 12.2 -> 9.5, backward 16.9 -> 14.9; benchmarks/sass_counts_state_tiles_offline.json).
# At 4 warps a 64 x 128 tile takes 168-255 registers: not offered.
WHOLE_STATE_ROWS = [{"BK": 128, "BV": bv, "num_warps": 8, "num_stages": s} for bv, s in ((64, 2), (64, 3), (32, 2))]
# Kernels are tuned per shape and per power-of-two bucket of the chunk count
# (``T_BUCKET``, otherwise unused): parallelism, hence the best config, changes with length.


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; PRECISION "ieee" for fp32 inputs (no tf32)."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def decay_block(b_a_t, b_l_t, b_a_s, b_l_s, b_a_ref, b_l_ref, m, OFF_DIAG, TRANS: tl.constexpr,
                PRECISE: tl.constexpr):
    """exp(a_t - a_s) for t in a row block and s in a column block of the same chunk, zero where not ``m``.

    ``a`` is the in-chunk cumsum (``l`` its low part when PRECISE). Off the
    diagonal (every s before every t) it factors through ``a_ref``, the last
    step of the column block, into an outer product of two vectors: both
    factors lie between the product and 1, so nothing overflows that the
    product would not, and no [BT, BT] exp is needed. [t, s], or [s, t] if TRANS.
    """
    if OFF_DIAG:
        b_u = b_a_t - b_a_ref
        b_w = b_a_ref - b_a_s
        if PRECISE:
            b_u += b_l_t - b_l_ref
            b_w += b_l_ref - b_l_s
        b_u = tl.exp(b_u)
        b_w = tl.exp(b_w)
        if TRANS:
            b_d = b_w[:, None] * b_u[None, :]
        else:
            b_d = b_u[:, None] * b_w[None, :]
        b_d = tl.where(m, b_d, 0.)
    else:
        if TRANS:
            b_seg = b_a_t[None, :] - b_a_s[:, None]
            if PRECISE:
                b_seg += b_l_t[None, :] - b_l_s[:, None]
        else:
            b_seg = b_a_t[:, None] - b_a_s[None, :]
            if PRECISE:
                b_seg += b_l_t[:, None] - b_l_s[None, :]
        b_d = tl.exp(tl.where(m, b_seg, float("-inf")))
    return b_d


@triton.jit
def softplus(v):
    # log1p(exp(v)) with the log1p correction: plain log(1 + e) loses the
    # relative precision of small dt, which fp32 tests see.
    e = tl.exp(tl.minimum(v, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
    return tl.where(v > 20.0, v, lp)


@triton.jit
def ssd_chunk_cumsum_fwd_kernel(
    dt, A, dt_bias, dtp, dA_cs, dA_lo,
    T, s_db, s_dt, s_dh,
    H: tl.constexpr, L: tl.constexpr, BH: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, PRECISE: tl.constexpr,
):
    i_c, i_b, i_hb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_c * L + tl.arange(0, L)
    o_h = i_hb * BH + tl.arange(0, BH)
    m_t, m_h = o_t < T, o_h < H
    m = m_t[:, None] & m_h[None, :]
    # [L, BH]
    p_dt = dt + i_b.to(tl.int64) * s_db + o_t[:, None].to(tl.int64) * s_dt + o_h[None, :] * s_dh
    b_dt = tl.load(p_dt, mask=m, other=0.).to(tl.float32)
    if HAS_BIAS:
        b_dt += tl.load(dt_bias + o_h, mask=m_h, other=0.).to(tl.float32)[None, :]
    if SOFTPLUS:
        b_dt = softplus(b_dt)
    # padded steps: dt' = 0, so they neither decay nor write the state
    b_dt = tl.where(m, b_dt, 0.)
    b_A = tl.load(A + o_h, mask=m_h, other=0.).to(tl.float32)
    p_o = (i_b * H + o_h[None, :]).to(tl.int64) * T + o_t[:, None]
    tl.store(dtp + p_o, b_dt, mask=m)
    if PRECISE:
        # Decays are exp of differences of these sums: late in a chunk the sums
        # are large and their difference small, so fp32 would lose ~1e-5 there.
        # Keep the sum as hi + lo; consumers subtract the hi parts (exact when
        # close) and the lo parts separately.
        b_cs64 = tl.cumsum(b_dt.to(tl.float64) * b_A.to(tl.float64)[None, :], axis=0)
        b_cs = b_cs64.to(tl.float32)
        tl.store(dA_lo + p_o, (b_cs64 - b_cs.to(tl.float64)).to(tl.float32), mask=m)
    else:
        b_cs = tl.cumsum(b_dt * b_A[None, :], axis=0)
    tl.store(dA_cs + p_o, b_cs, mask=m)


@triton.jit
def one_block_y(b_C, b_ht, b_g, b_S, b_a, b_l, m_ij, b_dt, b_x, b_D, HAS_D: tl.constexpr, PRECISE: tl.constexpr,
                PRECISION: tl.constexpr):
    """One head's y over a chunk of one time block, before the gate: what the carried state gives, exp(a_cs_t)
    C_t h_prev^T (``b_g``: exp(a_cs_t), zero where another document began), plus inside the chunk sum_s S_ts
    exp(a_cs_t - a_cs_s) dt_s x_s over the pairs s <= t of one document (``m_ij``), plus D x."""
    b_y = dot(b_C, b_ht, PRECISION) * b_g[:, None]
    b_W = b_S * decay_block(b_a, b_l, b_a, b_l, b_a, b_l, m_ij, False, False, PRECISE) * b_dt[None, :]
    b_y += dot(b_W.to(b_x.dtype), b_x, PRECISION)
    if HAS_D:
        b_y += b_x.to(tl.float32) * b_D
    return b_y


@triton.jit
def store_y(b_y, out, ypre, p_z, o_out, m, HAS_Z: tl.constexpr):
    """Stores y at ``o_out``; with z, y before the gate in ``ypre`` (the backward reads it) and y silu(z) in out."""
    if HAS_Z:
        tl.store(ypre + o_out, b_y.to(ypre.dtype.element_ty), mask=m)
        b_z = tl.load(p_z, mask=m, other=0.).to(tl.float32)
        b_y = b_y * b_z * tl.sigmoid(b_z)
    tl.store(out + o_out, b_y.to(out.dtype.element_ty), mask=m)


@autotune(
    configs=configs([{"num_warps": 4}, {"num_warps": 8}], {"num_warps": 4}, {"num_warps": 4}),
    key=["N", "L", "BT", "T_BUCKET"],
)
@triton.jit
def ssd_bmm_fwd_kernel(
    C, B, S,
    T, NT, T_BUCKET, s_Cb, s_Ct, s_Cg, s_Cn, s_Bb, s_Bt, s_Bg, s_Bn,
    G: tl.constexpr, N: tl.constexpr, L: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    NB: tl.constexpr = L // BT
    i_ci, i_bg = tl.program_id(0), tl.program_id(1)
    i_c, i_i = i_ci // NB, i_ci % NB
    i_b, i_g = i_bg // G, i_bg % G
    t0 = i_c * L
    o_i = i_i * BT + tl.arange(0, BT)
    o_n = tl.arange(0, BN)
    m_i, m_n = t0 + o_i < T, o_n < N
    p_C = C + i_b.to(tl.int64) * s_Cb + t0.to(tl.int64) * s_Ct + i_g * s_Cg + o_i[:, None] * s_Ct + o_n[None, :] * s_Cn
    # [BT, BN]
    b_C = tl.load(p_C, mask=m_i[:, None] & m_n[None, :], other=0.)
    p_B0 = B + i_b.to(tl.int64) * s_Bb + t0.to(tl.int64) * s_Bt + i_g * s_Bg
    p_S0 = S + (i_bg.to(tl.int64) * NT + i_c) * (L * L)
    # only blocks on and below the diagonal are ever read
    for i_j in range(0, i_i + 1):
        o_j = i_j * BT + tl.arange(0, BT)
        m_j = t0 + o_j < T
        # [BN, BT]: B_j^T, transposed by the pointers
        b_Bt = tl.load(p_B0 + o_j[None, :] * s_Bt + o_n[:, None] * s_Bn, mask=m_n[:, None] & m_j[None, :], other=0.)
        b_S = dot(b_C, b_Bt, PRECISION)
        tl.store(p_S0 + o_i[:, None] * L + o_j[None, :], b_S.to(S.dtype.element_ty))


@autotune(
    configs=configs(
        [{"BK": bk, "BV": bv, "num_warps": w, "num_stages": s}
         for bk in (32, 64) for bv in (32, 64) for w in (4, 8) for s in (2, 3)] + WHOLE_STATE_ROWS,
        {"BK": 32, "BV": 32, "num_warps": 4},
        {"BK": 64, "BV": 32, "num_warps": 4, "num_stages": 2},
    ),
    key=["P", "N", "L", "T_BUCKET", "LOCAL"],
)
@triton.jit
def ssd_state_fwd_kernel(
    x, B, dtp, dA_cs, dA_lo, doc, h0, states, hT, seg_local, seg_decay,
    T, NT, T_BUCKET, SEG, NSEG, s_xb, s_xt, s_xh, s_xp, s_Bb, s_Bt, s_Bg, s_Bn,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_DOC: tl.constexpr, PRECISE: tl.constexpr, PRECISION: tl.constexpr,
    LOCAL: tl.constexpr,
):
    """States entering every chunk, one program per (state tile, batch x head, segment of SEG chunks).

    Segments run in parallel (one per program would leave the GPU idle at batch 1). LOCAL (pass 1): the
    segment's end state from zero (seg_local) and the product of its chunk decays (seg_decay), so that the
    true end state is seg_local + seg_decay * start; ``ssd_chain_kernel`` (pass 2) turns those into the true
    start of every segment, which pass 3 reads from h0 (then shaped (batch x heads, NSEG, P, N)).
    """
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
    # [BV, BK] tile of a (P, N) state
    o_vk = o_v[:, None] * N + o_k[None, :]
    p_x0 = x + i_b.to(tl.int64) * s_xb + i_h * s_xh
    p_B0 = B + i_b.to(tl.int64) * s_Bb + i_g * s_Bg
    o_a0 = i_bh.to(tl.int64) * T
    o_d0 = i_b.to(tl.int64) * T

    o_seg = (i_bh.to(tl.int64) * NSEG + i_seg) * (P * N) + o_vk
    b_h = tl.zeros([BV, BK], dtype=tl.float32)
    b_P = 1.0
    if HAS_INIT and not LOCAL:
        b_h += tl.load(h0 + o_seg, mask=m_vk, other=0.)
    for i_c in range(i_seg * SEG, tl.minimum(NT, i_seg * SEG + SEG)):
        if not LOCAL:
            p_state = states + (i_bh.to(tl.int64) * NT + i_c) * (P * N) + o_vk
            tl.store(p_state, b_h.to(states.dtype.element_ty), mask=m_vk)
        t0 = i_c * L
        m_t = t0 + o_l < T
        i_end = tl.minimum(t0 + L, T) - 1
        b_a = tl.load(dA_cs + o_a0 + t0 + o_l, mask=m_t, other=0.)
        b_dt = tl.load(dtp + o_a0 + t0 + o_l, mask=m_t, other=0.)
        b_a_end = tl.load(dA_cs + o_a0 + i_end)
        b_seg = b_a_end - b_a
        if PRECISE:
            b_seg += tl.load(dA_lo + o_a0 + i_end) - tl.load(dA_lo + o_a0 + t0 + o_l, mask=m_t, other=0.)
        # [L] weight of each step in the chunk's own state: decay to the chunk end times dt
        b_w = tl.where(m_t, tl.exp(b_seg) * b_dt, 0.)
        b_decay = tl.exp(b_a_end)
        if HAS_DOC:
            b_doc = tl.load(doc + o_d0 + t0 + o_l, mask=m_t, other=-1)
            b_doc_end = tl.load(doc + o_d0 + i_end)
            b_doc_prev = tl.load(doc + o_d0 + tl.maximum(t0 - 1, 0))
            b_w = tl.where(b_doc == b_doc_end, b_w, 0.)
            b_decay = tl.where(b_doc_end == b_doc_prev, b_decay, 0.)
        # [BV, L]: x^T, transposed by the pointers
        p_xt = p_x0 + t0.to(tl.int64) * s_xt + o_l[None, :] * s_xt + o_v[:, None] * s_xp
        b_xt = tl.load(p_xt, mask=m_v[:, None] & m_t[None, :], other=0.)
        b_xt = (b_xt * b_w[None, :]).to(b_xt.dtype)
        # [L, BK]
        p_B = p_B0 + t0.to(tl.int64) * s_Bt + o_l[:, None] * s_Bt + o_k[None, :] * s_Bn
        b_B = tl.load(p_B, mask=m_t[:, None] & m_k[None, :], other=0.)
        b_h = b_h * b_decay + dot(b_xt, b_B, PRECISION)
        b_P = b_P * b_decay
    if LOCAL:
        tl.store(seg_local + o_seg, b_h, mask=m_vk)
        tl.store(seg_decay + i_bh.to(tl.int64) * NSEG + i_seg, b_P)
    elif i_seg == NSEG - 1:
        tl.store(hT + i_bh.to(tl.int64) * (P * N) + o_vk, b_h, mask=m_vk)


@triton.jit
def ssd_chain_kernel(seg_local, seg_decay, h_in, starts, NSEG, PN,
                     HAS_IN: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2 of the segmented state kernels: what enters each segment, from what enters the first.

    Per (batch x head): starts[s] = h entering segment s (in the walk's direction: last to first with
    REVERSE), h entering the next = seg_local[s] + seg_decay[s] * starts[s]. NSEG short elementwise steps.
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    o = i_c * BLOCK + tl.arange(0, BLOCK)
    m = o < PN
    b_h = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_IN:
        b_h += tl.load(h_in + i_bh.to(tl.int64) * PN + o, mask=m, other=0.)
    for i in range(NSEG):
        i_s = NSEG - 1 - i if REVERSE else i
        o_s = (i_bh.to(tl.int64) * NSEG + i_s) * PN + o
        tl.store(starts + o_s, b_h, mask=m)
        b_h = tl.load(seg_local + o_s, mask=m, other=0.) + tl.load(seg_decay + i_bh.to(tl.int64) * NSEG + i_s) * b_h


@autotune(
    configs=configs(
        [{"num_warps": w, "num_stages": s} for w in (4, 8) for s in (1, 2, 3)],
        {"num_warps": 4},
        {"num_warps": 8, "num_stages": 2},
    ),
    key=["P", "N", "L", "BT", "BV", "HAS_Z", "T_BUCKET"],
)
@triton.jit
def ssd_output_fwd_kernel(
    x, z, C, S, D, dtp, dA_cs, dA_lo, doc, states, out, ypre,
    T, NT, T_BUCKET, BHt, s_xb, s_xt, s_xh, s_xp, s_zb, s_zt, s_zh, s_zp, s_Cb, s_Ct, s_Cg, s_Cn,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, L: tl.constexpr,
    BT: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
    HAS_D: tl.constexpr, D_2D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DOC: tl.constexpr,
    PRECISE: tl.constexpr, PRECISION: tl.constexpr,
):
    NV: tl.constexpr = (P + BV - 1) // BV
    # One program per (chunk, head, head_dim tile), row blocks in a loop: the
    # state is read once per chunk. Heads vary fastest so the programs reading
    # one chunk's S (shared by the group) run together and hit L2.
    i_pid = tl.program_id(0)
    i_v, i_r = i_pid % NV, i_pid // NV
    i_bh, i_c = i_r % BHt, i_r // BHt
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    t0 = i_c * L
    o_v = i_v * BV + tl.arange(0, BV)
    o_n = tl.arange(0, BN)
    m_v, m_n = o_v < P, o_n < N
    o_a0 = i_bh.to(tl.int64) * T + t0
    o_d0 = i_b.to(tl.int64) * T + t0
    p_x0 = x + i_b.to(tl.int64) * s_xb + t0.to(tl.int64) * s_xt + i_h * s_xh
    p_z0 = z + i_b.to(tl.int64) * s_zb + t0.to(tl.int64) * s_zt + i_h * s_zh
    p_C0 = C + i_b.to(tl.int64) * s_Cb + t0.to(tl.int64) * s_Ct + i_g * s_Cg
    p_S0 = S + ((i_b * G + i_g).to(tl.int64) * NT + i_c) * (L * L)
    # [BN, BV]: the carried state, transposed by the pointers
    p_ht = states + (i_bh.to(tl.int64) * NT + i_c) * (P * N) + o_n[:, None] + o_v[None, :] * N
    b_ht = tl.load(p_ht, mask=m_n[:, None] & m_v[None, :], other=0.).to(C.dtype.element_ty)
    if HAS_DOC:
        b_doc_prev = tl.load(doc + i_b.to(tl.int64) * T + tl.maximum(t0 - 1, 0))
    if HAS_D:
        if D_2D:
            b_D = tl.load(D + i_h * P + o_v, mask=m_v, other=0.).to(tl.float32)[None, :]
        else:
            b_D = tl.load(D + i_h).to(tl.float32)
    # the last real step of the chunk, and the row blocks that hold real steps
    i_last = tl.minimum(L, T - t0) - 1
    NBv = i_last // BT + 1
    # padded rows take the last real cumsum: finite decays, masked at the end
    b_a_last = tl.load(dA_cs + o_a0 + i_last)
    for i_i in range(NBv):
        o_i = i_i * BT + tl.arange(0, BT)
        m_i = t0 + o_i < T
        b_a_i = tl.load(dA_cs + o_a0 + o_i, mask=m_i, other=b_a_last)
        b_l_i = b_a_i
        if PRECISE:
            b_l_i = tl.load(dA_lo + o_a0 + o_i, mask=m_i, other=0.)
        b_g = tl.exp(b_a_i)
        if HAS_DOC:
            b_doc_i = tl.load(doc + o_d0 + o_i, mask=m_i, other=-1)
            b_g = tl.where(b_doc_i == b_doc_prev, b_g, 0.)
        # what the carried state gives: exp(a_cs_t) C_t h_prev^T
        b_C = tl.load(p_C0 + o_i[:, None] * s_Ct + o_n[None, :] * s_Cn, mask=m_i[:, None] & m_n[None, :], other=0.)
        b_y = dot(b_C, b_ht, PRECISION) * b_g[:, None]
        # inside the chunk: sum_s S_ts exp(a_cs_t - a_cs_s) dt_s x_s over s <= t, same document
        for i_j in range(0, i_i + 1):
            o_j = i_j * BT + tl.arange(0, BT)
            m_j = t0 + o_j < T
            b_a_j = tl.load(dA_cs + o_a0 + o_j, mask=m_j, other=0.)
            b_dt_j = tl.load(dtp + o_a0 + o_j, mask=m_j, other=0.)
            # the decay factors through the column block's last step (used off the diagonal only)
            i_ref = tl.minimum(i_j * BT + BT - 1, i_last)
            b_a_ref = tl.load(dA_cs + o_a0 + i_ref)
            b_l_j, b_l_ref = b_a_j, b_a_ref
            if PRECISE:
                b_l_j = tl.load(dA_lo + o_a0 + o_j, mask=m_j, other=0.)
                b_l_ref = tl.load(dA_lo + o_a0 + i_ref)
            # padded rows too: their cumsum (0) could overflow the decay
            m_ij = (o_i[:, None] >= o_j[None, :]) & m_i[:, None] & m_j[None, :]
            if HAS_DOC:
                b_doc_j = tl.load(doc + o_d0 + o_j, mask=m_j, other=-2)
                m_ij = m_ij & (b_doc_i[:, None] == b_doc_j[None, :])
            # [BT, BT]
            b_S = tl.load(p_S0 + o_i[:, None] * L + o_j[None, :]).to(tl.float32)
            b_W = b_S * decay_block(b_a_i, b_l_i, b_a_j, b_l_j, b_a_ref, b_l_ref, m_ij, i_j < i_i, False,
                                    PRECISE) * b_dt_j[None, :]
            # [BT, BV]
            b_x = tl.load(p_x0 + o_j[:, None] * s_xt + o_v[None, :] * s_xp, mask=m_j[:, None] & m_v[None, :],
                          other=0.)
            b_y += dot(b_W.to(b_x.dtype), b_x, PRECISION)

        m_iv = m_i[:, None] & m_v[None, :]
        if HAS_D:
            b_xi = tl.load(p_x0 + o_i[:, None] * s_xt + o_v[None, :] * s_xp, mask=m_iv, other=0.).to(tl.float32)
            b_y += b_xi * b_D
        # outputs are contiguous (batch, T, heads, P)
        o_out = ((i_b.to(tl.int64) * T + t0 + o_i[:, None]) * H + i_h) * P + o_v[None, :]
        store_y(b_y, out, ypre, p_z0 + o_i[:, None] * s_zt + o_v[None, :] * s_zp, o_out, m_iv, HAS_Z)


@autotune(
    configs=configs(
        # num_stages > 1: the head loop is the innermost loop, so the pipeliner fetches the next heads' tiles.
        # Capped at 168 registers (204 uncapped at 4 warps, bf16, d_state 128; offline no spills) three programs
        # fit on an SM instead of two (picked at 1M, 5.36 -> 4.75 ms on an H100: benchmarks/ssd_maxnreg_h100.json)
        [{"num_warps": w, "num_stages": s} for w in (4, 8) for s in (1, 2, 3)]
        + [{"num_warps": 4, "num_stages": s, "maxnreg": 168} for s in (1, 2)],
        {"num_warps": 4},
        {"num_warps": 4, "num_stages": 1},
    ),
    key=["P", "N", "L", "HPS", "HAS_Z", "T_BUCKET"],
)
@triton.jit
def ssd_output_one_block_fwd_kernel(
    x, z, C, S, D, dtp, dA_cs, dA_lo, doc, states, out, ypre,
    T, NT, T_BUCKET, BGt, s_xb, s_xt, s_xh, s_xp, s_zb, s_zt, s_zh, s_zp, s_Cb, s_Ct, s_Cg, s_Cn,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, L: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, NSPLIT: tl.constexpr, HPS: tl.constexpr,
    HAS_D: tl.constexpr, D_2D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DOC: tl.constexpr,
    PRECISE: tl.constexpr, PRECISION: tl.constexpr,
):
    """``ssd_output_fwd_kernel`` for chunks of one time block (L = BT) and one head-dimension tile (P <= BV).

    One program per (chunk, batch x group, split of the group's heads) with the heads in a loop: the group's
    C and S are loaded once for all its heads, and the loop is the innermost one, so with num_stages > 1
    Triton's pipeliner fetches the next head's state and x while this one computes (the general kernel's
    programs each hold one head and run their one row and column block without overlap). Results as
    ``ssd_output_fwd_kernel``'s.
    """
    i_pid = tl.program_id(0)
    i_sp, i_r = i_pid % NSPLIT, i_pid // NSPLIT
    i_bg, i_c = i_r % BGt, i_r // BGt
    i_b, i_g = i_bg // G, i_bg % G
    t0 = i_c * L
    # the last real step of the chunk: padded rows take its cumsum (finite decays, masked at the end)
    i_last = tl.minimum(L, T - t0) - 1
    o_i = tl.arange(0, L)
    o_n = tl.arange(0, BN)
    o_v = tl.arange(0, BV)
    m_i, m_n, m_v = t0 + o_i < T, o_n < N, o_v < P
    m_iv = m_i[:, None] & m_v[None, :]
    o_d0 = i_b.to(tl.int64) * T + t0
    # [L(i), L(j)]: pairs j <= i of real steps, of one document
    m_ij = (o_i[:, None] >= o_i[None, :]) & m_i[:, None] & m_i[None, :]
    if HAS_DOC:
        b_doc_prev = tl.load(doc + i_b.to(tl.int64) * T + tl.maximum(t0 - 1, 0))
        b_doc_i = tl.load(doc + o_d0 + o_i, mask=m_i, other=-1)
        m_ij = m_ij & (b_doc_i[:, None] == b_doc_i[None, :])
    p_C0 = C + i_b.to(tl.int64) * s_Cb + t0.to(tl.int64) * s_Ct + i_g * s_Cg
    b_C = tl.load(p_C0 + o_i[:, None] * s_Ct + o_n[None, :] * s_Cn, mask=m_i[:, None] & m_n[None, :], other=0.)
    b_S = tl.load(S + (i_bg.to(tl.int64) * NT + i_c) * (L * L) + o_i[:, None] * L + o_i[None, :]).to(tl.float32)
    i_h0 = i_g * (H // G) + i_sp * HPS
    for i_hh in range(HPS):
        i_h = i_h0 + i_hh
        i_bh = i_b * H + i_h
        o_a0 = i_bh.to(tl.int64) * T + t0
        b_a = tl.load(dA_cs + o_a0 + o_i, mask=m_i, other=tl.load(dA_cs + o_a0 + i_last))
        b_l = b_a
        if PRECISE:
            b_l = tl.load(dA_lo + o_a0 + o_i, mask=m_i, other=0.)
        b_dt = tl.load(dtp + o_a0 + o_i, mask=m_i, other=0.)
        # [BN, BV]: the carried state, transposed by the pointers
        p_ht = states + (i_bh.to(tl.int64) * NT + i_c) * (P * N) + o_n[:, None] + o_v[None, :] * N
        b_ht = tl.load(p_ht, mask=m_n[:, None] & m_v[None, :], other=0.).to(C.dtype.element_ty)
        p_x = x + i_b.to(tl.int64) * s_xb + (t0 + o_i[:, None]).to(tl.int64) * s_xt + i_h * s_xh \
            + o_v[None, :] * s_xp
        b_x = tl.load(p_x, mask=m_iv, other=0.)
        # what the carried state gives: exp(a_cs_t) C_t h_prev^T
        b_g = tl.exp(b_a)
        if HAS_DOC:
            b_g = tl.where(b_doc_i == b_doc_prev, b_g, 0.)
        b_D = 0.
        if HAS_D:
            if D_2D:
                b_D = tl.load(D + i_h * P + o_v, mask=m_v, other=0.).to(tl.float32)[None, :]
            else:
                b_D = tl.load(D + i_h).to(tl.float32)
        b_y = one_block_y(b_C, b_ht, b_g, b_S, b_a, b_l, m_ij, b_dt, b_x, b_D, HAS_D, PRECISE, PRECISION)
        # outputs are contiguous (batch, T, heads, P)
        o_out = ((i_b.to(tl.int64) * T + t0 + o_i[:, None]) * H + i_h) * P + o_v[None, :]
        p_z = z + i_b.to(tl.int64) * s_zb + (t0 + o_i[:, None]).to(tl.int64) * s_zt + i_h * s_zh + o_v[None, :] * s_zp
        store_y(b_y, out, ypre, p_z, o_out, m_iv, HAS_Z)


@autotune(
    configs=configs(
        # bf16, 64 x 128 states: 251-255 registers at 4 warps, 189-235 at 8 (one program of 8 warps per SM, or two
        # of 4); capped at 128, two programs of 8 warps (152 B of spills offline:
        # benchmarks/sass_counts_state_tiles_offline.json)
        [{"num_warps": w, "num_stages": s} for w in (4, 8) for s in (1, 2, 3)]
        + [{"num_warps": 8, "num_stages": s, "maxnreg": 128} for s in (1, 2)],
        {"num_warps": 4},
        {"num_warps": 8, "num_stages": 2},
    ),
    key=["P", "N", "L", "HAS_Z", "T_BUCKET"],
)
@triton.jit
def ssd_state_output_fwd_kernel(
    x, z, B, C, S, D, dtp, dA_cs, dA_lo, doc, h0, states, hT, out, ypre,
    T, NT, T_BUCKET, SEG, NSEG, BHt, s_xb, s_xt, s_xh, s_xp, s_zb, s_zt, s_zh, s_zp,
    s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, L: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_D: tl.constexpr, D_2D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DOC: tl.constexpr,
    PRECISE: tl.constexpr, PRECISION: tl.constexpr,
):
    """The state walk's last pass (``ssd_state_fwd_kernel``, not LOCAL) and the output of the chunks it walks, in
    one kernel, for chunks of one time block and a whole state per program (P <= BV, N <= BN).

    One program per (segment, batch x head), the heads of a segment adjacent so that they read the group's B, C
    and S from L2. At each chunk the program holds the state entering it in registers: it stores it (the
    backward reads it), forms the chunk's y from it as ``ssd_output_one_block_fwd_kernel`` does, then moves it
    past the chunk. The separate output kernel read x and the stored state back: 9.6 GB at 1M tokens in the
    benchmark's shape, ~3 ms of an H100's bandwidth.
    """
    i_pid = tl.program_id(0)
    i_seg, i_bh = i_pid // BHt, i_pid % BHt
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    o_i = tl.arange(0, L)
    o_n = tl.arange(0, BN)
    o_v = tl.arange(0, BV)
    m_n, m_v = o_n < N, o_v < P
    m_vn = m_v[:, None] & m_n[None, :]
    # [BV, BN]: a whole (P, N) state
    o_vn = o_v[:, None] * N + o_n[None, :]
    p_x0 = x + i_b.to(tl.int64) * s_xb + i_h * s_xh
    p_z0 = z + i_b.to(tl.int64) * s_zb + i_h * s_zh
    p_B0 = B + i_b.to(tl.int64) * s_Bb + i_g * s_Bg
    p_C0 = C + i_b.to(tl.int64) * s_Cb + i_g * s_Cg
    o_a0 = i_bh.to(tl.int64) * T
    o_d0 = i_b.to(tl.int64) * T
    b_D = 0.
    if HAS_D:
        if D_2D:
            b_D = tl.load(D + i_h * P + o_v, mask=m_v, other=0.).to(tl.float32)[None, :]
        else:
            b_D = tl.load(D + i_h).to(tl.float32)

    b_h = tl.zeros([BV, BN], dtype=tl.float32)
    if HAS_INIT:
        b_h += tl.load(h0 + (i_bh.to(tl.int64) * NSEG + i_seg) * (P * N) + o_vn, mask=m_vn, other=0.)
    for i_c in range(i_seg * SEG, tl.minimum(NT, i_seg * SEG + SEG)):
        tl.store(states + (i_bh.to(tl.int64) * NT + i_c) * (P * N) + o_vn, b_h.to(states.dtype.element_ty),
                 mask=m_vn)
        t0 = i_c * L
        m_i = t0 + o_i < T
        m_iv = m_i[:, None] & m_v[None, :]
        i_last = tl.minimum(L, T - t0) - 1
        # padded rows take the last real cumsum: finite decays, masked below
        b_a_end = tl.load(dA_cs + o_a0 + t0 + i_last)
        b_a = tl.load(dA_cs + o_a0 + t0 + o_i, mask=m_i, other=b_a_end)
        b_l = b_a
        if PRECISE:
            b_l = tl.load(dA_lo + o_a0 + t0 + o_i, mask=m_i, other=0.)
        b_dt = tl.load(dtp + o_a0 + t0 + o_i, mask=m_i, other=0.)
        # [L(i), L(j)]: pairs j <= i of real steps, of one document
        m_ij = (o_i[:, None] >= o_i[None, :]) & m_i[:, None] & m_i[None, :]
        b_g = tl.exp(b_a)
        b_seg = b_a_end - b_a
        if PRECISE:
            b_seg += tl.load(dA_lo + o_a0 + t0 + i_last) - b_l
        # [L]: weight of each step in the chunk's own state (decay to the chunk end times dt)
        b_w = tl.where(m_i, tl.exp(b_seg) * b_dt, 0.)
        b_decay = tl.exp(b_a_end)
        if HAS_DOC:
            b_doc_prev = tl.load(doc + o_d0 + tl.maximum(t0 - 1, 0))
            b_doc_i = tl.load(doc + o_d0 + t0 + o_i, mask=m_i, other=-1)
            b_doc_end = tl.load(doc + o_d0 + t0 + i_last)
            m_ij = m_ij & (b_doc_i[:, None] == b_doc_i[None, :])
            b_g = tl.where(b_doc_i == b_doc_prev, b_g, 0.)
            b_w = tl.where(b_doc_i == b_doc_end, b_w, 0.)
            b_decay = tl.where(b_doc_end == b_doc_prev, b_decay, 0.)
        b_x = tl.load(p_x0 + (t0 + o_i[:, None]).to(tl.int64) * s_xt + o_v[None, :] * s_xp, mask=m_iv, other=0.)
        # [L, BN]
        b_C = tl.load(p_C0 + (t0 + o_i[:, None]).to(tl.int64) * s_Ct + o_n[None, :] * s_Cn,
                      mask=m_i[:, None] & m_n[None, :], other=0.)
        b_B = tl.load(p_B0 + (t0 + o_i[:, None]).to(tl.int64) * s_Bt + o_n[None, :] * s_Bn,
                      mask=m_i[:, None] & m_n[None, :], other=0.)
        b_S = tl.load(S + ((i_b * G + i_g).to(tl.int64) * NT + i_c) * (L * L) + o_i[:, None] * L
                      + o_i[None, :]).to(tl.float32)
        # what the carried state gives: exp(a_cs_t) C_t h_prev^T, h_prev rounded as the stored state is
        b_ht = tl.trans(b_h.to(states.dtype.element_ty).to(C.dtype.element_ty))
        b_y = one_block_y(b_C, b_ht, b_g, b_S, b_a, b_l, m_ij, b_dt, b_x, b_D, HAS_D, PRECISE, PRECISION)
        # outputs are contiguous (batch, T, heads, P)
        o_out = ((i_b.to(tl.int64) * T + t0 + o_i[:, None]) * H + i_h) * P + o_v[None, :]
        store_y(b_y, out, ypre, p_z0 + (t0 + o_i[:, None]).to(tl.int64) * s_zt + o_v[None, :] * s_zp, o_out, m_iv,
                HAS_Z)
        # the state entering the next chunk: h decay + (x w)^T B
        b_xw = tl.trans((b_x * b_w[:, None]).to(b_x.dtype))
        b_h = b_h * b_decay + dot(b_xw, b_B, PRECISION)
    if i_seg == NSEG - 1:
        tl.store(hT + i_bh.to(tl.int64) * (P * N) + o_vn, b_h, mask=m_vn)
