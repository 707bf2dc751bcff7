"""Exact loss and gradients over a long sequence, computed one window of tokens at a time.

Per-block activation checkpointing still keeps every block's input for the whole sequence (at 1M tokens,
d_model 768: 3 GiB per layer) and rebuilds a block over the whole length in backward. Here the *whole model*
on one window runs inside one checkpoint instead: window w takes the carried state of windows < w as tensor
inputs and returns its loss sum plus its own carried state as tensor outputs, with gradients (never detached).
Autograd then carries state gradients from window w+1 back into window w, so loss and gradients are those of
one pass over the sequence (not truncated backprop), while memory holds one window's activations (rebuilt in
backward, window by window from the last) plus what is carried:

- Mamba blocks: conv tail, fp32 SSM state and the last token's document id (``MambaState``): O(1) in length.
- Attention blocks: each window's rotated keys and values, kept as that window's own output and handed to
  every later window by reference (``PastKeys``): O(length), as attention needs; queries see them causally at
  global positions (RoPE offset, document mask, sliding window).

Compute: one extra forward, as with full activation checkpointing. The carried state is tiny next to the
activations, so memory is nearly constant in length for Mamba and linear for attention layers.

``torch.utils.checkpoint`` recomputes a window by calling the same function with the same Python inputs,
so everything below is functional: fresh state objects are built from the input tensors and never mutated.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..config.schema import MAMBA
from .blocks.attention import PastKeys
from .block import continue_mamba
from .loss import IGNORE_INDEX, chunked_cross_entropy_sum


def _mamba_step(block, x, seq_idx, past_doc, position, carried):
    return continue_mamba(block, x, seq_idx, carried)


def _attention_step(block, x, seq_idx, past_doc, position, carried):
    past = PastKeys(k=carried[0], v=carried[1], doc=past_doc, position=position)
    x = block(x, seq_idx, past)
    return x, (past.new_k, past.new_v)


def _correct_count(model, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Labelled positions whose most likely token is the label, logits a chunk at a time (never window x vocab)."""
    targets = labels != IGNORE_INDEX
    h, y = hidden[targets], labels[targets]
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, y.numel(), chunk_size):
        correct += (model.logits(h[start:start + chunk_size]).argmax(-1) == y[start:start + chunk_size]).sum()
    return correct


def _window(model, input_ids, labels, seq_idx, past_doc, position, loss_chunk_size, count_correct, carried):
    """(loss sum, correct predictions or None, new carried state per block) of one window; ``carried`` is that
    of the windows before."""
    x = model.embedding(input_ids)  # (B, W, d_model)
    new = []
    for block, state in zip(model.blocks, carried):
        step = _mamba_step if block.kind == MAMBA else _attention_step
        if block.kind in model.checkpoint_kinds and torch.is_grad_enabled():
            # Inside the window's recomputation, this block's insides are rebuilt once more: lower peak, larger windows.
            x, state = checkpoint(step, block, x, seq_idx, past_doc, position, state, use_reentrant=False)
        else:
            x, state = step(block, x, seq_idx, past_doc, position, state)
        new.append(state)
    hidden = model.norm_f(x)
    correct = _correct_count(model, hidden, labels, loss_chunk_size) if count_correct else None
    return chunked_cross_entropy_sum(hidden, model.head_weight, labels, loss_chunk_size), correct, new


def windowed_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, seq_idx: torch.Tensor | None,
                  window: int, loss_chunk_size: int = 8192) -> torch.Tensor:
    """Mean next-token loss over labels != -100 of ``model`` on the whole sequence, computed ``window`` tokens
    at a time; equal (loss and every gradient) to ``model.loss(model(input_ids, seq_idx), labels)``.

    input_ids, labels (B, T); seq_idx (B, T) document ids or None. The last window may be shorter.
    """
    return _windows(model, input_ids, labels, seq_idx, window, loss_chunk_size, count_correct=False)[0]


@torch.no_grad()
def windowed_evaluation(model, input_ids: torch.Tensor, labels: torch.Tensor, seq_idx: torch.Tensor | None,
                        window: int, loss_chunk_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, correct next-token predictions) over labels != -100, window by window, without gradients;
    the same as one pass (argmax of the logits at every labelled position)."""
    return _windows(model, input_ids, labels, seq_idx, window, loss_chunk_size, count_correct=True)


def _windows(model, input_ids, labels, seq_idx, window, loss_chunk_size, count_correct):
    B, T = input_ids.shape
    count = (labels != IGNORE_INDEX).sum()
    carried = []
    for block in model.blocks:
        if block.kind == MAMBA:
            state = block.mixer.empty_state(B, input_ids.device)
            carried.append((state.conv, state.ssm, state.doc))
        else:
            carried.append(((), ()))  # keys, values of no earlier window yet
    total = correct = None
    for start in range(0, T, window):
        span = slice(start, start + window)
        args = (input_ids[:, span], labels[:, span], None if seq_idx is None else seq_idx[:, span],
                None if seq_idx is None else seq_idx[:, :start], start, loss_chunk_size, count_correct, carried)
        if torch.is_grad_enabled():
            loss_sum, hits, new = checkpoint(_window, model, *args, use_reentrant=False)
        else:
            loss_sum, hits, new = _window(model, *args)
        total = loss_sum if total is None else total + loss_sum
        if count_correct:
            correct = hits if correct is None else correct + hits
        # Tuples, never lists appended in place: a window's recomputation must see exactly the keys it saw.
        carried = [state if block.kind == MAMBA else (old[0] + (state[0],), old[1] + (state[1],))
                   for block, old, state in zip(model.blocks, carried, new)]
    return total / count.clamp(min=1), correct
