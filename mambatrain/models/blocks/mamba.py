"""Mamba mixers: Mamba-1 (per-channel diagonal decay) and Mamba-2 (per-head scalar decay).

Both: in-projection -> short causal depthwise conv -> SiLU -> selective SSM
(with the D skip) -> gate -> out-projection. Parameter names follow mamba_ssm
(in_proj, conv1d, x_proj, dt_proj, dt_bias, A_log, D, norm, out_proj) so that
checkpoints map one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...config.schema import MambaConfig
from .. import scan
from .norm import GatedRMSNorm
from .precision import upcast


@dataclass
class MambaState:
    """What a Mamba mixer carries from one window of a stream to the next (batch-first).

    conv: the last d_conv - 1 inputs of the convolution, (B, d_conv - 1, conv channels);
    ssm: the float32 SSM state, (B, channels, d_state) for Mamba-1, (B, heads, head_dim, d_state) for Mamba-2;
    doc: the document id of the last token, (B,): a window that opens a new document starts from zero.
    """

    conv: torch.Tensor
    ssm: torch.Tensor
    doc: torch.Tensor

    def detach_(self) -> "MambaState":
        self.conv, self.ssm = self.conv.detach(), self.ssm.detach()
        return self


def _carry_in(state: MambaState | None, seq_idx: torch.Tensor | None):
    """Conv prefix, extended seq_idx and initial SSM state for a window that continues ``state``."""
    if state is None:
        return None, seq_idx, None
    if seq_idx is None:
        return state.conv, None, state.ssm
    width_1 = state.conv.shape[1]
    prefix_ids = state.doc[:, None].expand(-1, width_1).to(seq_idx.dtype)
    continues = (seq_idx[:, 0] == state.doc).to(state.ssm.dtype)
    initial = state.ssm * continues.view(-1, *([1] * (state.ssm.dim() - 1)))
    return state.conv, torch.cat([prefix_ids, seq_idx], dim=1), initial


def _last(t: torch.Tensor, n: int) -> torch.Tensor:
    """The last n steps of t (B, T, ...), all of them if T < n; ``t[:, -n:]`` would be all of t for n = 0."""
    return t[:, max(t.shape[1] - n, 0):]


def _carry_out(state: MambaState, conv_input: torch.Tensor, final: torch.Tensor, seq_idx: torch.Tensor | None):
    width_1 = state.conv.shape[1]  # d_conv - 1, which may be 0
    # Only the last width_1 steps go into the cat: a slice of a cat over the whole window would keep the
    # window's every input alive as long as the state lives (one window's worth per carried state).
    tail = _last(torch.cat([state.conv.to(conv_input.dtype), _last(conv_input, width_1)], dim=1), width_1)
    if seq_idx is not None:
        # The tail may reach back into an earlier document; its taps must not reach the next window, so those
        # entries are zeroed (entries carried in from before were zeroed already, so they count as state.doc).
        earlier = state.doc[:, None].expand(-1, width_1).to(seq_idx.dtype)
        tail_ids = _last(torch.cat([earlier, _last(seq_idx, width_1)], dim=1), width_1)
        tail = tail * (tail_ids == seq_idx[:, -1:])[..., None].to(tail.dtype)
        state.doc = seq_idx[:, -1].to(state.doc.dtype)
    state.conv, state.ssm = tail, final


def _dt_bias_init(size: int, config: MambaConfig) -> torch.Tensor:
    """Inverse softplus of dt drawn log-uniformly in [dt_min, dt_max] (Mamba papers)."""
    dt = torch.exp(torch.rand(size) * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min))
    dt = dt.clamp(min=config.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba1Mixer(nn.Module):
    def __init__(self, d_model: int, config: MambaConfig):
        super().__init__()
        self.config = config
        d_inner = config.expand * d_model
        self.d_inner, self.d_state, self.dt_rank = d_inner, config.d_state, config.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, config.d_conv, groups=d_inner, bias=config.conv_bias)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        self.dt_proj.bias.copy_(_dt_bias_init(self.d_inner, self.config))
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)
        for p in (self.dt_proj.bias, self.A_log, self.D):
            p._no_weight_decay = True

    def empty_state(self, batch: int, device, dtype=torch.float32) -> MambaState:
        return MambaState(conv=torch.zeros(batch, self.config.d_conv - 1, self.d_inner, device=device, dtype=dtype),
                          ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device),
                          doc=torch.zeros(batch, dtype=torch.int32, device=device))

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None,
                state: MambaState | None = None) -> torch.Tensor:
        """hidden (B, T, d_model) -> (B, T, d_model); ``state``, when given, is continued and updated in place."""
        B, T, _ = hidden.shape
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, T, d_inner) each
        prefix, conv_seq_idx, initial = _carry_in(state, seq_idx)
        conv_input = x
        x = scan.conv1d_silu(self.config.backend, x, self.conv1d, conv_seq_idx, prefix)
        dt_low, Bmat, Cmat = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt_low @ self.dt_proj.weight.t().to(dt_low.dtype)  # bias and softplus happen inside the scan
        y = scan.selective_scan(
            self.config.backend, x, dt, -torch.exp(upcast(self.A_log)),
            Bmat.view(B, T, 1, self.d_state), Cmat.view(B, T, 1, self.d_state),
            D=upcast(self.D), z=z, dt_bias=upcast(self.dt_proj.bias), dt_softplus=True,
            initial_state=initial, seq_idx=seq_idx, return_final_state=state is not None,
        )
        if state is not None:
            y, final = y
            _carry_out(state, conv_input, final, seq_idx)
        return self.out_proj(y)


class Mamba2Mixer(nn.Module):
    def __init__(self, d_model: int, config: MambaConfig, norm_eps: float = 1e-5):
        super().__init__()
        self.config = config
        d_inner = config.expand * d_model
        self.d_inner, self.d_state, self.head_dim = d_inner, config.d_state, config.head_dim
        self.n_heads, self.n_groups = d_inner // config.head_dim, config.n_groups
        conv_dim = d_inner + 2 * self.n_groups * self.d_state
        self.in_proj = nn.Linear(d_model, d_inner + conv_dim + self.n_heads, bias=False)  # z, xBC, dt
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, config.d_conv, groups=conv_dim, bias=config.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(d_inner, eps=norm_eps, group_size=d_inner // self.n_groups, backend=config.backend)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        self.dt_bias.copy_(_dt_bias_init(self.n_heads, self.config))
        self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(self.config.a_init_min, self.config.a_init_max)))
        self.D.fill_(1.0)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    def empty_state(self, batch: int, device, dtype=torch.float32) -> MambaState:
        conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        return MambaState(conv=torch.zeros(batch, self.config.d_conv - 1, conv_dim, device=device, dtype=dtype),
                          ssm=torch.zeros(batch, self.n_heads, self.head_dim, self.d_state, device=device),
                          doc=torch.zeros(batch, dtype=torch.int32, device=device))

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None,
                state: MambaState | None = None) -> torch.Tensor:
        """hidden (B, T, d_model) -> (B, T, d_model); ``state``, when given, is continued and updated in place."""
        B, T, _ = hidden.shape
        gn = self.n_groups * self.d_state
        z, xBC, dt = self.in_proj(hidden).split([self.d_inner, self.d_inner + 2 * gn, self.n_heads], dim=-1)
        prefix, conv_seq_idx, initial = _carry_in(state, seq_idx)
        conv_input = xBC
        xBC = scan.conv1d_silu(self.config.backend, xBC, self.conv1d, conv_seq_idx, prefix)
        x, Bmat, Cmat = xBC.split([self.d_inner, gn, gn], dim=-1)
        y = scan.ssd_scan(
            self.config.backend,
            x.view(B, T, self.n_heads, self.head_dim), dt, -torch.exp(upcast(self.A_log)),
            Bmat.view(B, T, self.n_groups, self.d_state), Cmat.view(B, T, self.n_groups, self.d_state),
            D=upcast(self.D), dt_bias=upcast(self.dt_bias), dt_softplus=True, initial_state=initial,
            seq_idx=seq_idx, return_final_state=state is not None, chunk_size=self.config.chunk_size,
        )
        if state is not None:
            y, final = y
            _carry_out(state, conv_input, final, seq_idx)
        y = self.norm(y.reshape(B, T, self.d_inner), z)
        return self.out_proj(y)


def mamba_mixer(d_model: int, config: MambaConfig, norm_eps: float = 1e-5) -> nn.Module:
    if config.version == 1:
        return Mamba1Mixer(d_model, config)
    return Mamba2Mixer(d_model, config, norm_eps)
