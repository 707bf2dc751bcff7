"""Causal depthwise convolution + SiLU as a loop over the taps: the specification.

For each batch row b, step t and channel c (W taps, tap W-1 multiplies the current input):

    pre[t] = bias + sum_{k=0}^{W-1} weight[W-1-k] * xin[t-k] * [doc(t-k) == doc(t)]
    out[t] = silu(pre[t])

xin[s] is x[s] for s >= 0 and prefix[W-1+s] for -(W-1) <= s < 0 (the last W-1
inputs of the previous window; zeros without a prefix). ``seq_idx`` holds the
document ids of the rows of xin: (B, T) without a prefix, (B, W-1+T) with one
(its first W-1 entries are the prefix's). Computed in float32 (float64 for
float64 inputs), returned in x's dtype.
"""

import torch
import torch.nn.functional as F


def causal_conv1d_silu_naive(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(causal depthwise conv1d(x)), one tap at a time.

    Shapes: x (B, T, C); weight (C, W); bias (C,); prefix (B, W-1, C), used in
    x's dtype (as the model's PyTorch path does); seq_idx (B, T) or, with a
    prefix, (B, W-1+T) integer document ids. Returns (B, T, C) in x's dtype.
    """
    batch, length, channels = x.shape
    width = weight.shape[-1]
    ct = torch.promote_types(x.dtype, torch.float32)
    if prefix is None:
        xin = F.pad(x.to(ct), (0, 0, width - 1, 0))  # (B, W-1+T, C)
    else:
        xin = torch.cat([prefix.to(x.dtype).to(ct), x.to(ct)], dim=1)
    if seq_idx is not None and prefix is None:
        # the padded zeros contribute nothing whatever their id
        seq_idx = F.pad(seq_idx, (width - 1, 0), value=-1)
    pre = x.new_zeros(batch, length, channels, dtype=ct)
    if bias is not None:
        pre = pre + bias.to(ct)
    for k in range(width):  # tap k reaches k steps back
        back = xin[:, width - 1 - k: width - 1 - k + length]  # xin[t-k], (B, T, C)
        if seq_idx is not None:
            same_doc = seq_idx[:, width - 1 - k: width - 1 - k + length] == seq_idx[:, width - 1:]
            back = back * same_doc[..., None].to(ct)
        pre = pre + weight[:, width - 1 - k].to(ct) * back
    return F.silu(pre).to(x.dtype)
