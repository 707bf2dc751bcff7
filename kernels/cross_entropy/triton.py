"""Fused output projection + cross-entropy: cuBLAS matmuls around one Triton kernel per chunk of rows.

Per chunk of rows, the forward pass does all the work, the backward pass only scales it:

    logits = h @ W^T                       cuBLAS, in h's dtype (bf16 under autocast)
    kernel: per row, lse and loss in fp32; logits overwritten by softmax - onehot (in place, h's dtype)
    dh     = dlogits @ W                   cuBLAS, written into its rows of dh
    dW    += dlogits^T @ h                 cuBLAS, accumulated over chunks in fp32

and saves dh and dW; the backward multiplies them by the loss's incoming gradient. Three matmuls per chunk
(against four, with the log-softmax twice, under the checkpointed PyTorch path), no fp32 logits, and memory
of one chunk of logits plus dh and dW. The maths is in README.md.

Vocabulary as in flash-linear-attention: ``i_`` program ids, ``o_`` offsets, ``m_`` masks, ``p_`` pointers,
``b_`` block values. Row offsets are int64 (8192 rows x 50k vocabulary is near 2^31 elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..settings import INTERPRET, autotune, configs, new_buffer
from .naive import IGNORE_INDEX

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Vocabulary entries per block (each pass walks the row in blocks of BV). Not yet tuned on a GPU; autotuning
# runs the kernel once per config on the same logits, so it restores them between runs (the kernel overwrites
# them). The interpreter's 256 makes the test vocabularies (257, 1000) span several blocks.
_SPACE = [dict(BV=4096, num_warps=8), dict(BV=8192, num_warps=16), dict(BV=2048, num_warps=4),
          dict(BV=8192, num_warps=8)]
CONFIGS = configs(_SPACE, dict(BV=256), _SPACE[0])


# ----------------------------------------------------------------------------- kernel


@autotune(configs=CONFIGS, key=["V", "WRITE_GRAD"], restore_value=["logits"])
@triton.jit
def cross_entropy_kernel(
    logits, labels, loss,
    V, stride,
    IGNORE: tl.constexpr, WRITE_GRAD: tl.constexpr, BV: tl.constexpr,
):
    """One program per row: loss = lse - logit[label] (0 for an ignored row), in fp32.

    Pass 1 keeps a running max and sum of exponentials over blocks of the row (online logsumexp). With
    WRITE_GRAD, pass 2 overwrites the row with softmax - onehot (zeros for an ignored row).
    """
    i_r = tl.program_id(0).to(tl.int64)
    p_row = logits + i_r * stride
    b_y = tl.load(labels + i_r)
    ignored = b_y == IGNORE
    tl.device_assert(ignored | ((b_y >= 0) & (b_y < V)), "label outside [0, vocab) and not -100")

    b_m = tl.full([], float("-inf"), dtype=tl.float32)  # running max
    b_s = tl.full([], 0.0, dtype=tl.float32)  # running sum of exp(x - b_m)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)  # [BV]
        b_x = tl.load(p_row + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32)  # [BV]
        b_new = tl.maximum(b_m, tl.max(b_x, axis=0))
        b_s = b_s * tl.exp(b_m - b_new) + tl.sum(tl.exp(b_x - b_new), axis=0)
        b_m = b_new
    b_lse = b_m + tl.log(b_s)
    b_xy = tl.load(p_row + tl.where(ignored, 0, b_y)).to(tl.float32)  # read before pass 2 overwrites it
    tl.store(loss + i_r, tl.where(ignored, 0.0, b_lse - b_xy))

    if WRITE_GRAD:
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)  # [BV]
            m_v = o_v < V
            b_x = tl.load(p_row + o_v, mask=m_v, other=0.0).to(tl.float32)
            b_g = tl.exp(b_x - b_lse) - tl.where(o_v == b_y, 1.0, 0.0)
            b_g = tl.where(ignored, 0.0, b_g)
            tl.store(p_row + o_v, b_g.to(logits.dtype.element_ty), mask=m_v)


# ----------------------------------------------------------------------------- launchers


def cross_entropy_rows(logits: Tensor, labels: Tensor, loss: Tensor, write_grad: bool) -> None:
    """Per-row loss of logits (rows, vocab) into ``loss`` (rows,) fp32; with ``write_grad`` the logits
    become the gradient of the summed loss, softmax - onehot, in place."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    assert logits.stride(1) == 1 and labels.is_contiguous() and loss.is_contiguous()
    cross_entropy_kernel[(rows,)](logits, labels, loss, vocab, logits.stride(0),
                                  IGNORE=IGNORE_INDEX, WRITE_GRAD=write_grad)


def linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int,
                             grad_hidden: bool, grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Summed loss (fp32 scalar), d loss / d hidden (hidden's shape and dtype, or empty) and d loss / d weight
    (weight's shape and dtype, accumulated in fp32, or empty) of hidden (rows, d) and labels (rows,)."""
    rows, d = hidden.shape
    vocab = weight.shape[0]
    w = weight.to(hidden.dtype)  # (vocab, d): the fp32 (tied) head, cast once per call
    losses = new_buffer(rows, device=hidden.device, dtype=torch.float32)
    dh = new_buffer(rows, d, device=hidden.device, dtype=hidden.dtype) if grad_hidden else hidden.new_empty(0)
    dw = torch.zeros(vocab, d, device=weight.device, dtype=torch.float32) if grad_weight else weight.new_empty(0)
    # the caller chose the dtype (autocast's, if on): no second cast inside
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, rows, chunk_size):
            end = min(start + chunk_size, rows)
            h = hidden[start:end]  # (chunk, d)
            logits = h @ w.t()  # (chunk, vocab)
            cross_entropy_rows(logits, labels[start:end], losses[start:end], grad_hidden or grad_weight)
            # logits now holds d loss / d logits
            if grad_hidden:
                torch.mm(logits, w, out=dh[start:end])
            if grad_weight:
                dw += logits.t() @ h  # (vocab, d) in h's dtype (fp32 accumulation inside the matmul)
    return losses.sum(), dh, dw.to(weight.dtype)


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("mambatrain::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int,
                              grad_hidden: bool, grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    return linear_cross_entropy_fwd(hidden, weight, labels, chunk_size, grad_hidden, grad_weight)


@_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, labels, chunk_size, grad_hidden, grad_weight):
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if grad_weight else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    _, _, _, _, grad_hidden, grad_weight = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.grad_hidden, ctx.grad_weight = grad_hidden, grad_weight
    ctx.set_materialize_grads(False)  # the gradients of dh and dw (never used) arrive as None


def _backward(ctx, dloss, _ddh, _ddw):
    dh, dw = ctx.saved_tensors
    if dloss is None:
        return None, None, None, None, None, None
    return (dh * dloss if ctx.grad_hidden else None, dw * dloss if ctx.grad_weight else None,
            None, None, None, None)


_linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int = 8192) -> Tensor:
    """Summed cross-entropy of the logits hidden @ weight^T over labels != -100; as ``linear_cross_entropy_naive``.

        loss = sum over rows with label != -100 of  logsumexp(logits_row) - logits_row[label]

    Shapes: hidden (..., d_model), fp32, bf16 or fp16 (under autocast, cast to autocast's dtype, as the
    matmul would be); weight (vocab, d_model), any float dtype (cast to hidden's per call); labels (...) int,
    aligned with hidden. Returns the fp32 scalar loss. With gradients on, the forward pass computes the
    gradients of hidden and weight as well (held until the backward, which scales them); without, only the
    loss, one chunk of logits at a time.
    """
    if not (hidden.is_cuda or INTERPRET):
        raise RuntimeError("the cross-entropy kernel runs on CUDA tensors (or under TRITON_INTERPRET=1); "
                           "use linear_cross_entropy_naive on CPU")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.dtype in DTYPES:  # autocast leaves float64 alone
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
    if hidden.dtype not in DTYPES:
        raise TypeError(f"the cross-entropy kernel takes fp32, bf16 or fp16 hidden, got {hidden.dtype} "
                        "(float64 takes the PyTorch path: linear_cross_entropy_naive)")
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight must be (vocab, {d}), got {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    grad = torch.is_grad_enabled()
    loss, _, _ = torch.ops.mambatrain.linear_cross_entropy_fwd(
        hidden.reshape(-1, d).contiguous(), weight, labels.reshape(-1).long().contiguous(), chunk_size,
        grad and hidden.requires_grad, grad and weight.requires_grad)
    return loss
