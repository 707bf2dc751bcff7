"""Causal self-attention with RoPE and grouped-query heads, through SDPA.

Always causal: a language model block must never see the future (mamba_ssm's
attention block defaults to non-causal; we do not copy that). For decoding, a
``KVCache`` keeps the rotated keys and values of the tokens already seen, so a
window of new tokens (the prompt, then one token at a time) continues the sequence
at the right RoPE positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from ...config.schema import AttentionConfig
from .precision import upcast


def rotary_tables(length: int, head_dim: int, base: float, device, offset: int = 0):
    """cos and sin of shape (length, head_dim / 2), in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); rotate the two halves of each head (GPT-NeoX / Llama layout)
    x1, x2 = upcast(x).chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


def attention_mask(q_doc: torch.Tensor, k_doc: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   sliding_window: int | None) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask of T queries over S keys: causal, within one document, inside the window.

    q_doc (B, T) and k_doc (B, S) are document ids; q_pos (T,) and k_pos (S,) absolute positions.
    """
    allowed = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    if sliding_window is not None:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < sliding_window)
    same_doc = q_doc[:, :, None] == k_doc[:, None, :]
    return (allowed[None] & same_doc)[:, None]


def document_mask(seq_idx: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask: causal, within one document, inside the window.

    It costs T^2 memory: long packed sequences should use a block-sparse kernel
    instead (see the data pipeline issue); short ones are fine.
    """
    positions = torch.arange(seq_idx.shape[1], device=seq_idx.device)
    return attention_mask(seq_idx, seq_idx, positions, positions, sliding_window)


@dataclass
class KVCache:
    """What an attention block keeps of the tokens it has seen, for decoding (batch-first); updated in place.

    k, v: rotated keys and values, (B, n_kv_heads, S, head_dim); with a sliding window only the last
    window - 1 positions are kept, so S stays bounded.
    doc: the document id of each cached position, (B, S).
    position: tokens seen so far, i.e. the RoPE position of the next token.
    """

    k: torch.Tensor
    v: torch.Tensor
    doc: torch.Tensor
    position: int = 0

    def keys_with(self, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor):
        """Keys, values (B, Hkv, S, hd) and doc ids (B, S) of the cached positions followed by the new ones."""
        return (torch.cat([self.k.to(k.dtype), k], dim=2), torch.cat([self.v.to(v.dtype), v], dim=2),
                torch.cat([self.doc, doc.to(self.doc.dtype)], dim=1))


@dataclass
class PastKeys:
    """Keys and values of the earlier windows of a sequence, for training window by window (``models.windowed``).

    k, v: one rotated (B, n_kv_heads, window, head_dim) tensor per earlier window, in order; kept as separate
    chunks (each the output of its own window) so that no window saves a copy of all earlier keys.
    doc: document ids of the earlier positions, (B, position), or None when the batch has no ``seq_idx``.
    position: tokens before this window, i.e. the RoPE position of its first token.
    After the block runs, ``new_k`` and ``new_v`` hold this window's keys and values; nothing else changes.
    """

    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]
    doc: torch.Tensor | None
    position: int
    new_k: torch.Tensor | None = None
    new_v: torch.Tensor | None = None

    def since(self, first: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The chunks' keys and values from position ``first`` on (chunks wholly before it are skipped)."""
        keys, values, offset = [], [], 0
        for k, v in zip(self.k, self.v):
            end = offset + k.shape[2]
            if end > first:
                keys.append(k[:, :, max(0, first - offset):])
                values.append(v[:, :, max(0, first - offset):])
            offset = end
        return keys, values


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

    def empty_cache(self, batch: int, device, dtype=torch.float32) -> KVCache:
        empty = torch.zeros(batch, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(k=empty, v=empty.clone(), doc=torch.zeros(batch, 0, dtype=torch.int32, device=device))

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None,
                state: KVCache | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model); ``state``, when given, is continued and updated in place."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        offset = 0 if state is None else state.position
        cos, sin = rotary_tables(T, self.head_dim, self.rope_base, x.device, offset)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(state, PastKeys):
            y = self._attend_past(q, k, v, seq_idx, state)
        elif state is not None:
            y = self._attend_cached(q, k, v, seq_idx, state)
        elif seq_idx is None and self.sliding_window is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            if seq_idx is None:
                seq_idx = torch.zeros(B, T, dtype=torch.int32, device=x.device)
            mask = document_mask(seq_idx, self.sliding_window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor | None,
                       state: KVCache) -> torch.Tensor:
        """Queries of the new tokens over the cached keys and their own; appends them to the cache."""
        B, _, T, _ = q.shape
        if seq_idx is None:  # the new tokens continue the last cached document
            last = state.doc[:, -1:] if state.doc.shape[1] else torch.zeros(B, 1, dtype=torch.int32, device=q.device)
            seq_idx = last.expand(B, T)
        keys, values, docs = state.keys_with(k, v, seq_idx)  # (B, Hkv, S, hd), (B, S)
        S, start = keys.shape[2], state.position
        q_pos = torch.arange(start, start + T, device=q.device)
        k_pos = torch.arange(start + T - S, start + T, device=q.device)
        mask = attention_mask(seq_idx.to(docs.dtype), docs, q_pos, k_pos, self.sliding_window)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        keep = S if self.sliding_window is None else min(S, self.sliding_window - 1)
        state.k, state.v, state.doc = keys[:, :, S - keep:], values[:, :, S - keep:], docs[:, S - keep:]
        state.position = start + T
        return y

    def _attend_past(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_idx: torch.Tensor | None,
                     past: PastKeys) -> torch.Tensor:
        """Queries of this window over the earlier windows' keys and its own; sets ``past.new_k/new_v``."""
        B, _, T, _ = q.shape
        start = past.position
        # v is a view of the whole qkv output: carried as is, every earlier window would keep all of qkv alive
        # (3x the values' bytes) until the backward reaches it. k, rotated, is already a tensor of its own.
        past.new_k, past.new_v = k, v.contiguous()
        # With a sliding window, keys before the first query's reach are never looked at: skip them (linear cost).
        first = 0 if self.sliding_window is None else max(0, start - (self.sliding_window - 1))
        keys, values = past.since(first)
        keys, values = torch.cat(keys + [k], dim=2), torch.cat(values + [v], dim=2)  # (B, Hkv, S, hd)
        if self.n_kv_heads != self.n_heads:
            # The lower-right causal kernels take equal head counts; widening costs one window's worth per head.
            keys = keys.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            values = values.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        S = keys.shape[2]
        if seq_idx is None and self.sliding_window is None:
            # The last T keys are this window's: causal alignment at the lower right, no dense (T, S) mask.
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(T, S))
        if seq_idx is None:
            q_doc = torch.zeros(B, T, dtype=torch.int32, device=q.device)
            k_doc = torch.zeros(B, S, dtype=torch.int32, device=q.device)
        else:
            q_doc = seq_idx
            k_doc = torch.cat([past.doc[:, first:].to(seq_idx.dtype), seq_idx], dim=1)
        q_pos = torch.arange(start, start + T, device=q.device)
        k_pos = torch.arange(start + T - S, start + T, device=q.device)
        mask = attention_mask(q_doc, k_doc, q_pos, k_pos, self.sliding_window)  # (B, 1, T, S)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
