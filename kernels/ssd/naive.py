"""Mamba-2 (SSD) scan as a plain loop over time: the specification.

Each head has one scalar decay A, so the state is a (head_dim, d_state) matrix:

    dt_t = softplus(dt_t + dt_bias)              (if dt_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * outer(x_t, B_t)    # (head_dim, d_state)
    y_t  = h_t @ C_t + D * x_t
    y_t  = y_t * silu(z_t)                       (if z is given)

The state is float32 whatever the input dtype. Where ``seq_idx`` changes
between t-1 and t a new document starts and h_{t-1} is taken as zero.
The chunk size of the fast kernel changes only the order of the sums, never
the result, so this loop takes none.
"""

import torch
import torch.nn.functional as F


def _expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    # (batch, length, groups, d_state) -> (batch, length, heads, d_state)
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def ssd_naive(
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
):
    """SSD scan, one time step at a time.

    Shapes: x, z (batch, length, heads, head_dim); dt (batch, length, heads);
    A, dt_bias (heads,); D (heads,) or (heads, head_dim);
    B, C (batch, length, groups, d_state) with heads divisible by groups;
    initial_state (batch, heads, head_dim, d_state); seq_idx (batch, length).
    Returns y (batch, length, heads, head_dim) in x's dtype, and the final
    state (batch, heads, head_dim, d_state) in float32 when ``return_final_state``.
    """
    batch, length, heads, head_dim = x.shape
    xf, dtf = x.float(), dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    h = x.new_zeros(batch, heads, head_dim, B.shape[-1], dtype=torch.float32)
    if initial_state is not None:
        h = h + initial_state.float()
    ys = []
    for t in range(length):
        decay = torch.exp(dtf[:, t] * A.float())[:, :, None, None]  # (batch, heads, 1, 1)
        if seq_idx is not None and t > 0:
            same_doc = (seq_idx[:, t] == seq_idx[:, t - 1]).float()[:, None, None, None]
            h = h * same_doc
        # Groups are widened one step at a time: widening all of B and C at once costs length x heads x d_state.
        B_t, C_t = _expand_groups(B[:, t, None].float(), heads)[:, 0], _expand_groups(C[:, t, None].float(), heads)[:, 0]
        update = (dtf[:, t, :, None] * xf[:, t])[..., None] * B_t[:, :, None, :]
        h = decay * h + update
        ys.append((h * C_t[:, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        Df = D.float() if D.dim() == 2 else D.float()[:, None]
        y = y + xf * Df
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y


def ssd_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One step of the recurrence for generation; updates ``state`` in place.

    Shapes: state (batch, heads, head_dim, d_state) float32; x, z (batch, heads,
    head_dim); dt (batch, heads); B, C (batch, groups, d_state).
    Returns y (batch, heads, head_dim) in x's dtype.
    """
    y, new_state = ssd_naive(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D,
        None if z is None else z[:, None], dt_bias, dt_softplus,
        initial_state=state, return_final_state=True,
    )
    state.copy_(new_state)
    return y[:, 0]
