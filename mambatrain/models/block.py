"""One residual block: norm -> mixer -> residual, then (optionally) norm -> MLP -> residual.

The block does not care which mixer it holds; the factory decides.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks.mamba import MambaState


class Block(nn.Module):
    def __init__(self, kind: str, mixer: nn.Module, d_model: int, norm_cls, mlp: nn.Module | None = None):
        super().__init__()
        self.kind = kind  # "M" or "A": the letter of the recipe's pattern
        self.norm = norm_cls(d_model)
        self.mixer = mixer
        self.mlp_norm = norm_cls(d_model) if mlp is not None else None
        self.mlp = mlp

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None, state=None) -> torch.Tensor:
        """``state`` is the mixer's carried state (MambaState or KVCache), continued and updated in place."""
        x = x + self.mixer(self.norm(x), seq_idx=seq_idx, state=state)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


def continue_mamba(block: Block, x: torch.Tensor, seq_idx: torch.Tensor | None, carried: tuple):
    """A Mamba block continuing ``carried`` = (conv, ssm, doc), functionally: (output, new carried tuple).

    A fresh MambaState each call (the block updates its state in place), so an activation checkpoint can
    recompute the call from the very state it first saw.
    """
    state = MambaState(*carried)
    x = block(x, seq_idx, state)
    return x, (state.conv, state.ssm, state.doc)
