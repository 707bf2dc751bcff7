"""Analytic model FLOPs from the recipe alone (Lightning's counter cannot see Triton kernels).

Counts multiply-adds as 2 FLOPs; training = forward + backward = 3 x forward.
Used for model FLOPs utilisation (MFU).
"""

from __future__ import annotations

from .config.schema import ATTENTION, MAMBA, ModelConfig

# Dense bf16 peak FLOP/s by GPU name fragment (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device_name: str) -> float | None:
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if fragment in device_name:
            return flops
    return None


def _mamba_forward_flops(config: ModelConfig) -> float:
    m, d = config.mamba, config.d_model
    d_inner = m.expand * d
    if m.version == 1:
        projections = d * 2 * d_inner + d_inner * (m.dt_rank + 2 * m.d_state) + m.dt_rank * d_inner + d_inner * d
        scan = 9 * d_inner * m.d_state  # decay, update, readout: a few FLOPs per state element
        return 2 * projections + 2 * d_inner * m.d_conv + scan
    n_heads = d_inner // m.head_dim
    conv_dim = d_inner + 2 * m.n_groups * m.d_state
    projections = d * (d_inner + conv_dim + n_heads) + d_inner * d
    # SSD per token and head: causal intra-chunk C.B^T and its product with x (half a chunk on average),
    # chunk-state accumulation and the state readout.
    q = m.chunk_size
    ssd = n_heads * (q * (m.d_state + m.head_dim) + 4 * m.head_dim * m.d_state)
    return 2 * projections + 2 * conv_dim * m.d_conv + ssd


def _attention_forward_flops(config: ModelConfig, seq_len: int) -> float:
    a, d = config.attention, config.d_model
    head_dim = d // a.n_heads
    projections = d * (a.n_heads + 2 * a.n_kv_heads) * head_dim + a.n_heads * head_dim * d
    context = seq_len if a.sliding_window is None else min(seq_len, a.sliding_window)
    # Causal QK^T and PV: each token attends to (on average) half the context.
    return 2 * projections + 2 * 2 * a.n_heads * head_dim * (context / 2)


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    total = 0.0
    for letter in config.pattern:
        total += _mamba_forward_flops(config) if letter == MAMBA else 0.0
        total += _attention_forward_flops(config, seq_len) if letter == ATTENTION else 0.0
        total += 2 * 3 * config.d_model * config.d_mlp
    return total + 2 * config.d_model * config.vocab_size


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    return 3 * forward_flops_per_token(config, seq_len)
