"""The layer pattern (e.g. ``MMAM``) -> blocks, through one factory."""

from __future__ import annotations

from functools import partial

from torch import nn

from ..config.schema import ATTENTION, MAMBA, ModelConfig
from .block import Block
from .blocks.attention import CausalSelfAttention
from .blocks.mamba import mamba_mixer
from .blocks.mlp import SwiGLU
from .blocks.norm import RMSNorm


def create_block(letter: str, config: ModelConfig) -> Block:
    if letter == MAMBA:
        mixer = mamba_mixer(config.d_model, config.mamba, config.norm_eps)
    elif letter == ATTENTION:
        mixer = CausalSelfAttention(config.d_model, config.attention)
    else:
        raise ValueError(f"unknown layer letter {letter!r}")
    mlp = SwiGLU(config.d_model, config.d_mlp) if config.d_mlp > 0 else None
    return Block(letter, mixer, config.d_model, partial(RMSNorm, eps=config.norm_eps), mlp)


def create_blocks(config: ModelConfig) -> nn.ModuleList:
    return nn.ModuleList(create_block(letter, config) for letter in config.pattern)
