"""Mamba-1 selective scan as a plain loop over time: the specification.

    dt_t = softplus(dt_t + dt_bias)              (if dt_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t          # (channels, d_state)
    y_t  = h_t @ C_t + D * x_t
    y_t  = y_t * silu(z_t)                       (if z is given)

The state h is float32 whatever the input dtype (float64 for float64 inputs, so
that exactness tests in float64 hold to float64 rounding). Where ``seq_idx`` changes
between t-1 and t a new document starts and h_{t-1} is taken as zero.
"""

import torch
import torch.nn.functional as F


def _expand_groups(t: torch.Tensor, channels: int) -> torch.Tensor:
    # (batch, length, groups, d_state) -> (batch, length, channels, d_state)
    return t.repeat_interleave(channels // t.shape[2], dim=2)


def selective_scan_naive(
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
    """Selective scan, one time step at a time.

    Shapes: x, dt, z (batch, length, channels); A (channels, d_state);
    B, C (batch, length, groups, d_state) with channels divisible by groups;
    D, dt_bias (channels,); initial_state (batch, channels, d_state);
    seq_idx (batch, length) integer document ids.
    Returns y (batch, length, channels) in x's dtype, and the final state
    (batch, channels, d_state) in float32 (float64 for float64 x) when ``return_final_state``.
    """
    batch, length, channels = x.shape
    ct = torch.promote_types(x.dtype, torch.float32)
    xf, dtf = x.to(ct), dt.to(ct)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(ct)
    if dt_softplus:
        dtf = F.softplus(dtf)
    Af = A.to(ct)
    h = x.new_zeros(batch, channels, A.shape[1], dtype=ct)
    if initial_state is not None:
        h = h + initial_state.to(ct)
    ys = []
    for t in range(length):
        decay = torch.exp(dtf[:, t, :, None] * Af)  # (batch, channels, d_state)
        if seq_idx is not None and t > 0:
            same_doc = (seq_idx[:, t] == seq_idx[:, t - 1]).to(ct)[:, None, None]
            h = h * same_doc
        # Groups are widened one step at a time: widening all of B and C at once costs length x channels x d_state.
        B_t, C_t = _expand_groups(B[:, t, None].to(ct), channels)[:, 0], _expand_groups(C[:, t, None].to(ct), channels)[:, 0]
        h = decay * h + (dtf[:, t] * xf[:, t])[:, :, None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + xf * D.to(ct)
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y


def selective_state_update(
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

    Shapes: state (batch, channels, d_state) float32; x, dt, z (batch, channels);
    B, C (batch, groups, d_state). Returns y (batch, channels) in x's dtype.
    """
    y, new_state = selective_scan_naive(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D,
        None if z is None else z[:, None], dt_bias, dt_softplus,
        initial_state=state, return_final_state=True,
    )
    state.copy_(new_state)
    return y[:, 0]
