"""The PyTorch references equal the recurrence computed element by element in float64.

The references are the CPU training path and the oracle of the Triton kernels,
so they are checked against the simplest possible form: scalar loops.
"""

import math

import pytest
import torch

from mambatrain_kernels.selective_scan import selective_scan_naive, selective_state_update
from mambatrain_kernels.ssd import ssd_naive, ssd_state_update


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def silu(v: float) -> float:
    return v / (1 + math.exp(-v))


def scalar_selective_scan(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx):
    batch, length, channels = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    y = torch.zeros(batch, length, channels, dtype=torch.float64)
    final = torch.zeros(batch, channels, d_state, dtype=torch.float64)
    for b in range(batch):
        for c in range(channels):
            g = c // (channels // groups)
            h = [float(h0[b, c, n]) for n in range(d_state)]
            for t in range(length):
                if t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                    h = [0.0] * d_state
                step = softplus(float(dt[b, t, c]) + float(dt_bias[c]))
                out = 0.0
                for n in range(d_state):
                    h[n] = math.exp(step * float(A[c, n])) * h[n] + step * float(B[b, t, g, n]) * float(x[b, t, c])
                    out += h[n] * float(C[b, t, g, n])
                out += float(D[c]) * float(x[b, t, c])
                y[b, t, c] = out * silu(float(z[b, t, c]))
            final[b, c] = torch.tensor(h)
    return y, final


def scalar_ssd(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx):
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    y = torch.zeros(x.shape, dtype=torch.float64)
    final = torch.zeros(batch, heads, head_dim, d_state, dtype=torch.float64)
    for b in range(batch):
        for hd in range(heads):
            g = hd // (heads // groups)
            for p in range(head_dim):
                h = [float(h0[b, hd, p, n]) for n in range(d_state)]
                for t in range(length):
                    if t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                        h = [0.0] * d_state
                    step = softplus(float(dt[b, t, hd]) + float(dt_bias[hd]))
                    decay = math.exp(step * float(A[hd]))
                    out = 0.0
                    for n in range(d_state):
                        h[n] = decay * h[n] + step * float(x[b, t, hd, p]) * float(B[b, t, g, n])
                        out += h[n] * float(C[b, t, g, n])
                    out += float(D[hd]) * float(x[b, t, hd, p])
                    y[b, t, hd, p] = out * silu(float(z[b, t, hd, p]))
                final[b, hd, p] = torch.tensor(h)
    return y, final


def documents(batch, length, gen):
    # Random document boundaries, at least one per row when length allows.
    starts = torch.rand(batch, length, generator=gen) < 0.15
    starts[:, 0] = False
    return starts.cumsum(1).to(torch.int32)


@pytest.mark.parametrize("length", [1, 7, 23])
def test_selective_scan_reference_equals_scalar_recurrence(length):
    gen = torch.Generator().manual_seed(length)
    batch, channels, groups, d_state = 2, 4, 2, 3
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x, dt, z = r(batch, length, channels), r(batch, length, channels), r(batch, length, channels)
    A = -torch.exp(r(channels, d_state))
    B, C = r(batch, length, groups, d_state), r(batch, length, groups, d_state)
    D, dt_bias, h0 = r(channels), r(channels), r(batch, channels, d_state)
    seq_idx = documents(batch, length, gen)
    y, final = selective_scan_naive(x, dt, A, B, C, D, z, dt_bias, True, h0, seq_idx, return_final_state=True)
    y_ref, final_ref = scalar_selective_scan(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length", [1, 7, 23])
def test_ssd_reference_equals_scalar_recurrence(length):
    gen = torch.Generator().manual_seed(100 + length)
    batch, heads, head_dim, groups, d_state = 2, 4, 3, 2, 3
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x, z = r(batch, length, heads, head_dim), r(batch, length, heads, head_dim)
    dt, A = r(batch, length, heads), -torch.exp(r(heads))
    B, C = r(batch, length, groups, d_state), r(batch, length, groups, d_state)
    D, dt_bias, h0 = r(heads), r(heads), r(batch, heads, head_dim, d_state)
    seq_idx = documents(batch, length, gen)
    y, final = ssd_naive(x, dt, A, B, C, D, z, dt_bias, True, h0, seq_idx, return_final_state=True)
    y_ref, final_ref = scalar_ssd(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-6, atol=1e-6)


def test_single_step_updates_continue_the_scan():
    gen = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=gen)
    x, dt, z = r(1, 5, 4), r(1, 5, 4), r(1, 5, 4)
    A, B, C, D, bias = -torch.exp(r(4, 3)), r(1, 5, 1, 3), r(1, 5, 1, 3), r(4), r(4)
    y_full = selective_scan_naive(x, dt, A, B, C, D, z, bias, True)
    state = torch.zeros(1, 4, 3)
    steps = [selective_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, z[:, t], bias, True)
             for t in range(5)]
    torch.testing.assert_close(torch.stack(steps, 1), y_full)

    xs, dts, As = r(1, 5, 2, 3), r(1, 5, 2), -torch.exp(r(2))
    y_full = ssd_naive(xs, dts, As, B, C, None, None, None, True)
    state = torch.zeros(1, 2, 3, 3)
    steps = [ssd_state_update(state, xs[:, t], dts[:, t], As, B[:, t], C[:, t], dt_softplus=True) for t in range(5)]
    torch.testing.assert_close(torch.stack(steps, 1), y_full)
