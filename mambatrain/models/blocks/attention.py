"""Causal self-attention with RoPE and grouped-query heads, through SDPA.

Always causal: a language model block must never see the future (mamba_ssm's
attention block defaults to non-causal; we do not copy that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config.schema import AttentionConfig


def rotary_tables(length: int, head_dim: int, base: float, device, offset: int = 0):
    """cos and sin of shape (length, head_dim / 2), in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); rotate the two halves of each head (GPT-NeoX / Llama layout)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


def document_mask(seq_idx: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask: causal, within one document, inside the window.

    It costs T^2 memory: long packed sequences should use a block-sparse kernel
    instead (see the data pipeline issue); short ones are fine.
    """
    T = seq_idx.shape[1]
    i = torch.arange(T, device=seq_idx.device)
    allowed = i[None, :] <= i[:, None]
    if sliding_window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < sliding_window)
    same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]
    return (allowed[None] & same_doc)[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, config: AttentionConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = d_model // config.n_heads
        self.rope_base = config.rope_base
        self.sliding_window = config.sliding_window
        self.qkv = nn.Linear(d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary_tables(T, self.head_dim, self.rope_base, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if seq_idx is None and self.sliding_window is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            if seq_idx is None:
                seq_idx = torch.zeros(B, T, dtype=torch.int32, device=x.device)
            mask = document_mask(seq_idx, self.sliding_window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
