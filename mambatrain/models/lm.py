"""The language model: embedding -> blocks -> final RMSNorm -> (tied) LM head."""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config.schema import MAMBA, ModelConfig
from .block import continue_mamba
from .blocks.mamba import MambaState
from .blocks.norm import RMSNorm
from .factory import create_blocks
from .loss import chunked_cross_entropy


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = create_blocks(config)
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.checkpoint_kinds: set[str] = set()  # block letters whose activations are recomputed in backward
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and not name.endswith("dt_proj"):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        # Residual-stream writers start smaller so the stream's variance does not grow with depth (GPT-2).
        for name, param in self.named_parameters():
            if name.endswith(("out_proj.weight", "mlp.down.weight")):
                param.div_(math.sqrt(2 * self.config.n_layers))

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None,
                states: list | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, T, d_model); see ``logits`` and ``loss``.

        ``states`` (from ``empty_states``) carries each Mamba block's state from the previous window of the
        same streams into this one and is updated in place; attention blocks see only the current window,
        unless ``states`` comes from ``decoding_states``, whose KV caches let them see every earlier window.
        """
        x = self.embedding(input_ids)
        for i, block in enumerate(self.blocks):
            state = states[i] if states is not None else None
            if block.kind in self.checkpoint_kinds and torch.is_grad_enabled() and isinstance(state, MambaState):
                # The recomputation calls the function again: it must start from the state before this block.
                x, carried = checkpoint(continue_mamba, block, x, seq_idx, (state.conv, state.ssm, state.doc),
                                        use_reentrant=False)
                state.conv, state.ssm, state.doc = carried
            elif block.kind in self.checkpoint_kinds and torch.is_grad_enabled():
                x = checkpoint(block, x, seq_idx, state, use_reentrant=False)
            else:
                x = block(x, seq_idx, state)
        return self.norm_f(x)

    def empty_states(self, batch: int, device) -> list:
        """Zero carried state for every Mamba block (None for attention blocks)."""
        return [block.mixer.empty_state(batch, device) if block.kind == MAMBA else None for block in self.blocks]

    def decoding_states(self, batch: int, device) -> list:
        """Carried state for decoding: zero Mamba state, and an empty KV cache for every attention block.

        A prompt through ``forward(prompt, states=...)`` (prefill), then each new token the same way, gives
        the logits of one pass over the whole sequence. Mamba state stays the same size however long the
        sequence; a KV cache grows by one position per token (up to the sliding window, if any).
        """
        return [block.mixer.empty_state(batch, device) if block.kind == MAMBA
                else block.mixer.empty_cache(batch, device) for block in self.blocks]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.head_weight.t().to(hidden.dtype)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
        return chunked_cross_entropy(hidden, self.head_weight, labels, chunk_size)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by block kind (M, A), plus embedding, head and final norm."""
        counts: Counter[str] = Counter()
        for block in self.blocks:
            counts[f"{block.kind} blocks"] += sum(p.numel() for p in block.parameters())
        counts["embedding"] = self.embedding.weight.numel()
        counts["final norm"] = sum(p.numel() for p in self.norm_f.parameters())
        if self.lm_head is not None:
            counts["lm head"] = self.lm_head.weight.numel()
        counts["total"] = sum(p.numel() for p in self.parameters())
        return dict(counts)
