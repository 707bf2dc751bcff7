"""Mamba-2 (SSD) scan as the chunked algorithm in plain PyTorch.

The readable form of what ``triton.py`` fuses (Mamba-2 paper, ``ssd_minimal``):
split time into chunks of ``chunk_size``; inside a chunk the output is a masked
matrix product (quadratic in the chunk, on matmuls), across chunks a state of
(head_dim, d_state) is passed along. It is the CPU path of the model (much
faster than the time loop of ``naive.py``), differentiates through autograd,
and computes in float32 (float64 inputs stay float64).

Document resets (``seq_idx``) become a mask: token s reaches token t only when
no reset lies in (s, t]. ``doc`` counts the resets up to each token, so that is
``doc[s] == doc[t]``; the state carried into a chunk reaches the tokens still
in the document of the token before the chunk.
"""

import torch
import torch.nn.functional as F


def document_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """Number of document starts in (0, t] for each t: equal ids <=> no reset between.

    Robust to ids that repeat after a change (0, 1, 0 is three documents).
    """
    changed = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return F.pad(changed.cumsum(1, dtype=torch.int32), (1, 0))


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L, L): sum of a over (s, t] for s <= t, -inf above the diagonal.

    Sums each segment directly instead of differencing the cumulative sum, so
    short segments late in a chunk keep full precision.
    """
    L = a.shape[-1]
    a = a[..., None, :].expand(*a.shape, L)  # [..., t, s] = a[s]... transposed below
    a = a.transpose(-1, -2)  # [..., u, t] = a[u]
    below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), -1)
    seg = a.masked_fill(~below, 0).cumsum(-2)  # [..., t, s] = sum_{s < u <= t} a[u]
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return seg.masked_fill(~causal, float("-inf"))


def ssd_chunked_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = 256,
):
    """SSD scan, chunked; arguments, shapes and results as ``ssd_naive``."""
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    hpg = heads // groups
    L = chunk_size
    nc = -(-length // L)
    pad = nc * L - length
    ct = torch.promote_types(x.dtype, torch.float32)

    dtf = dt.to(ct)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(ct)
    if dt_softplus:
        dtf = F.softplus(dtf)
    # Padded steps have dt = 0: they neither decay nor write the state.
    dtf = F.pad(dtf, (0, 0, 0, pad))
    xf = F.pad(x.to(ct), (0, 0, 0, 0, 0, pad))
    Bf = F.pad(B.to(ct), (0, 0, 0, 0, 0, pad))
    Cf = F.pad(C.to(ct), (0, 0, 0, 0, 0, pad))
    doc = torch.zeros(batch, length, dtype=torch.int32, device=x.device) if seq_idx is None else document_ids(seq_idx)
    # padding joins the last document: with dt = 0 it changes nothing there
    doc = torch.cat([doc, doc[:, -1:].expand(batch, pad)], dim=1)

    # chunked views: k indexes the heads of a group
    xc = (xf * dtf[..., None]).view(batch, nc, L, groups, hpg, head_dim)  # dt_s x_s
    Bc = Bf.view(batch, nc, L, groups, d_state)
    Cc = Cf.view(batch, nc, L, groups, d_state)
    a = (dtf * A.to(ct)).view(batch, nc, L, groups, hpg).permute(0, 3, 4, 1, 2)  # [b, g, k, c, l]
    a_cs = a.cumsum(-1)
    dc = doc.view(batch, nc, L)
    same_doc = dc[:, :, :, None] == dc[:, :, None, :]  # [b, c, t, s]

    # 1. inside each chunk: y_t = sum_{s<=t} (C_t . B_s) exp(a_cs_t - a_cs_s) dt_s x_s
    decay = torch.exp(_segsum(a)).masked_fill(~same_doc[:, None, None], 0)  # [b, g, k, c, t, s]
    CB = torch.einsum("bctgn,bcsgn->bgcts", Cc, Bc)
    y = torch.einsum("bgcts,bgkcts,bcsgkp->bctgkp", CB, decay, xc)

    # 2. state written by each chunk: sum_s exp(a_cs_end - a_cs_s) dt_s x_s B_s^T, own document only
    to_end = torch.exp(a_cs[..., -1:] - a_cs) * (dc == dc[:, :, -1:])[:, None, None].to(ct)
    chunk_states = torch.einsum("bcsgn,bgkcs,bcsgkp->bcgkpn", Bc, to_end, xc)

    # 3. pass the state across chunks (it survives a chunk only if no reset lies in it)
    prev_doc = torch.cat([dc[:, :1, 0], dc[:, :-1, -1]], dim=1)  # document of the token before each chunk
    keeps = (dc[:, :, -1] == prev_doc).to(ct)  # [b, c]
    chunk_decay = torch.exp(a_cs[..., -1])  # [b, g, k, c]
    h = x.new_zeros(batch, groups, hpg, head_dim, d_state, dtype=ct)
    if initial_state is not None:
        h = h + initial_state.to(ct).view(batch, groups, hpg, head_dim, d_state)
    prev_states = []
    for c in range(nc):
        prev_states.append(h)
        h = (keeps[:, c, None, None, None, None] * chunk_decay[..., c, None, None]) * h + chunk_states[:, c]
    prev_states = torch.stack(prev_states, dim=1)  # [b, c, g, k, p, n]

    # 4. what the carried state gives each token: exp(a_cs_t) C_t h_prev, first document only
    from_start = torch.exp(a_cs) * (dc == prev_doc[:, :, None])[:, None, None].to(ct)  # [b, g, k, c, t]
    y = y + torch.einsum("bctgn,bcgkpn,bgkct->bctgkp", Cc, prev_states, from_start)

    y = y.reshape(batch, nc * L, heads, head_dim)[:, :length]
    if D is not None:
        Df = D.to(ct) if D.dim() == 2 else D.to(ct)[:, None]
        y = y + x.to(ct) * Df
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(x.dtype)
    if return_final_state:
        # The last chunk's padding (dt = 0) leaves the state unchanged. float32 (float64 for float64 inputs, so
        # that windows carrying the state stay exact in float64 tests).
        return y, h.reshape(batch, heads, head_dim, d_state).to(ct)
    return y
