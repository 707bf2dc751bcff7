"""One token through the model with carried state: the recurrent form of each mixer, for decoding.

A prompt goes through ``LanguageModel.forward(prompt, states=model.decoding_states(...))`` in one
pass (prefill); every later token goes through ``decode_step``. Mamba mixers then take one step of
their recurrence through the kernels' state-update references (constant work and memory per token);
attention blocks attend over their KV cache. The result equals one pass over the whole sequence
(tests/inference/test_generate.py holds them equal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambatrain_kernels.selective_scan import selective_state_update
from mambatrain_kernels.ssd import ssd_state_update

from ..models.blocks.mamba import Mamba1Mixer, Mamba2Mixer, MambaState
from ..models.lm import LanguageModel


def conv_step(conv: nn.Conv1d, x: torch.Tensor, state: MambaState) -> torch.Tensor:
    """The depthwise causal convolution at one new input x (B, C); shifts x into ``state.conv``."""
    window = torch.cat([state.conv.to(x.dtype), x[:, None]], dim=1)  # (B, d_conv, C); the last tap is x
    state.conv = window[:, 1:]
    y = (window * conv.weight[:, 0, :].t().to(x.dtype)).sum(1)
    return y if conv.bias is None else y + conv.bias.to(x.dtype)


def mamba1_step(mixer: Mamba1Mixer, hidden: torch.Tensor, state: MambaState) -> torch.Tensor:
    """hidden (B, d_model) -> (B, d_model), as ``Mamba1Mixer.forward`` at one position."""
    x, z = mixer.in_proj(hidden).chunk(2, dim=-1)  # (B, d_inner) each
    x = F.silu(conv_step(mixer.conv1d, x, state))
    dt_low, B, C = mixer.x_proj(x).split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt = dt_low @ mixer.dt_proj.weight.t().to(dt_low.dtype)  # bias and softplus inside the update
    y = selective_state_update(state.ssm, x, dt, -torch.exp(mixer.A_log.float()), B[:, None], C[:, None],
                               D=mixer.D.float(), z=z, dt_bias=mixer.dt_proj.bias.float(), dt_softplus=True)
    return mixer.out_proj(y)


def mamba2_step(mixer: Mamba2Mixer, hidden: torch.Tensor, state: MambaState) -> torch.Tensor:
    """hidden (B, d_model) -> (B, d_model), as ``Mamba2Mixer.forward`` at one position."""
    batch, gn = hidden.shape[0], mixer.n_groups * mixer.d_state
    z, xBC, dt = mixer.in_proj(hidden).split([mixer.d_inner, mixer.d_inner + 2 * gn, mixer.n_heads], dim=-1)
    xBC = F.silu(conv_step(mixer.conv1d, xBC, state))
    x, B, C = xBC.split([mixer.d_inner, gn, gn], dim=-1)
    y = ssd_state_update(state.ssm, x.view(batch, mixer.n_heads, mixer.head_dim), dt, -torch.exp(mixer.A_log.float()),
                         B.view(batch, mixer.n_groups, mixer.d_state), C.view(batch, mixer.n_groups, mixer.d_state),
                         D=mixer.D.float(), dt_bias=mixer.dt_bias.float(), dt_softplus=True)  # (B, H, P)
    return mixer.out_proj(mixer.norm(y.reshape(batch, mixer.d_inner), z))


def mixer_step(mixer: nn.Module, hidden: torch.Tensor, state) -> torch.Tensor:
    if isinstance(mixer, Mamba1Mixer):
        return mamba1_step(mixer, hidden, state)
    if isinstance(mixer, Mamba2Mixer):
        return mamba2_step(mixer, hidden, state)
    return mixer(hidden[:, None], state=state)[:, 0]  # attention: one query over the KV cache


@torch.no_grad()
def decode_step(model: LanguageModel, tokens: torch.Tensor, states: list) -> torch.Tensor:
    """tokens (B,) -> final normalised hidden states (B, d_model); ``states`` (from prefill) advance by one."""
    x = model.embedding(tokens)  # (B, d_model)
    for block, state in zip(model.blocks, states):
        x = x + mixer_step(block.mixer, block.norm(x), state)
        if block.mlp is not None:
            x = x + block.mlp(block.mlp_norm(x))
    return model.norm_f(x)
