"""The training loss, forward and backward, replayed from two CUDA graphs (``trainer.cuda_graph``).

An eager training step of a 24-layer Mamba-2 issues a few thousand kernel launches, each behind Python code
(custom-op dispatch, Triton's launcher, autocast's weight casts). At 16k tokens on an H100 the host needs
~150 ms to issue what the GPU runs in ~110: the GPU waits. A captured graph replays all of them with one
launch, so the step costs the GPU's time alone.

``torch.cuda.make_graphed_callables`` captures the forward (model + chunked loss, or the windowed loss) and
its backward. The backward returns the parameters' gradients to autograd, which accumulates them into
``.grad`` as usual: gradient clipping, accumulation, the NaN guard and the optimizer all run unchanged, outside
the graph. A graph replays fixed addresses and shapes: each batch is copied into the tensors captured from the
first one; a batch of any other shape (or with / without document ids where the first had the opposite) runs
eagerly, with a warning the first time.

The replayed backward hands each parameter's gradient over in one fixed buffer of the graph, and autograd
makes an unshared incoming gradient the ``.grad`` itself: ``.grad`` then *is* that buffer, and the next
replay overwrites it. One backward per optimizer step never notices; with gradients accumulated over
micro-batches (trainer.accumulate_grad_batches > 1) the sum would become twice the last micro-batch's
gradient. ``accumulate_gradients=True`` makes the first gradient of each step a copy (4 bytes per parameter,
one copy per step), so later ones add into memory of its own.

The capture must be the only autograd graph of these parameters alive: a live eager graph (say, a loss not yet
released) holds gradient accumulators made on the default stream, and the captured backward would then have
to wait on that stream, which CUDA forbids during a capture. In training the first step captures, before any
eager backward.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Iterable

import torch
from torch import nn

log = logging.getLogger("mambatrain")

LossFn = Callable[..., torch.Tensor]  # (model, input_ids, labels, seq_idx or None) -> scalar loss


class _LossModule(nn.Module):
    """The model and its loss as one module: make_graphed_callables differentiates a module's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.captured: list[torch.Tensor] | None = None  # the losses of the capture, while it runs

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, seq_idx: torch.Tensor | None = None):
        loss = self.loss_fn(self.model, input_ids, labels, seq_idx)
        if self.captured is not None:
            self.captured.append(loss)
        return loss


class GraphedLoss:
    """``loss_fn(model, input_ids, labels, seq_idx)`` with its forward and backward replayed from CUDA graphs
    captured at the first call (after ``warmup`` eager passes that compile and autotune the kernels).

    Eager instead (same result) when gradients are off, the model is in eval mode, or the batch's shapes differ
    from the captured ones. Autocast, when on, is kept at capture with its weight-cast cache off (a cached cast
    would be captured once and go stale as the weights change).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, warmup: int = 1, accumulate_gradients: bool = False):
        self.module = _LossModule(model, loss_fn)
        self.warmup = warmup
        self.accumulate_gradients = accumulate_gradients
        self._signature: tuple | None = None
        self._warned = False

    @staticmethod
    def _signature_of(args: tuple[torch.Tensor, ...]) -> tuple:
        return tuple((a.shape, a.dtype, a.device) for a in args)

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, seq_idx: torch.Tensor | None = None):
        args = (input_ids, labels) if seq_idx is None else (input_ids, labels, seq_idx)
        if not (torch.is_grad_enabled() and self.module.training and input_ids.is_cuda):
            return self.module.loss_fn(self.module.model, input_ids, labels, seq_idx)
        signature = self._signature_of(args)
        with _autocast_without_cache():
            if self._signature is None:
                self._capture(args)
                self._signature = signature
            elif signature != self._signature:
                if not self._warned:
                    log.warning("trainer.cuda_graph: a batch of shapes %s, not the captured %s, runs eagerly "
                                "(slower; same result)", [tuple(a.shape) for a in args],
                                [tuple(s[0]) for s in self._signature])
                    self._warned = True
                return self.module.loss_fn(self.module.model, input_ids, labels, seq_idx)
            # The graph's output is one fixed tensor, overwritten at every replay: hand out a copy.
            return self.module(*args).clone()

    def _capture(self, args: tuple[torch.Tensor, ...]) -> None:
        static = tuple(a.clone() for a in args)
        log.info("trainer.cuda_graph: capturing the forward and backward of batches shaped %s "
                 "(%d eager warm-up pass%s first)", [tuple(a.shape) for a in args], self.warmup,
                 "" if self.warmup == 1 else "es")
        self._warm_up(static)
        self.module.captured = []
        try:
            torch.cuda.make_graphed_callables(self.module, static, num_warmup_iters=0, allow_unused_input=True)
        except RuntimeError as error:
            if _ran_out_of_memory(error):
                # CUDA then reports the aborted capture ("capturing stream has unjoined work"), not the cause.
                raise RuntimeError("trainer.cuda_graph: the GPU ran out of memory while capturing the training step "
                                   "(the graph's memory pool holds the step's activations apart from the allocator's "
                                   "cache); use a shorter trainer.sequence_window, checkpoint more block kinds "
                                   "(trainer.activation_checkpointing) or set trainer.cuda_graph: false") from error
            raise RuntimeError(f"trainer.cuda_graph: capturing the training step failed ({error}); train without "
                               "it (trainer.cuda_graph: false) and report the model and data that caused this") from error
        finally:
            captured, self.module.captured = self.module.captured, None
        # make_graphed_callables keeps the captured loss, and through its autograd graph the parameters'
        # gradient accumulators, made on the capture's stream: every replay's backward would then add into
        # .grad across streams (torch warns, and synchronizes). Replays need neither the loss's history nor
        # those accumulators; without them each backward makes its own on its stream.
        for loss in captured:
            loss.detach_()
        if self.accumulate_gradients:
            copy_first_gradients(self.module.model.parameters())

    def _warm_up(self, static: tuple[torch.Tensor, ...]) -> None:
        """The eager passes before the capture (kernels compile and autotune), on a side stream as
        make_graphed_callables runs its own, but with nothing of them left alive when the capture starts.

        Its own warm-up keeps its last pass's loss and gradients referenced through the capture: their 4 bytes
        per parameter are then held at the capture's peak, and the loss's autograd graph keeps the parameters'
        gradient accumulators made on the warm-up stream, which the captured backward would reuse.
        """
        params = [p for p in self.module.parameters() if p.requires_grad]
        torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(self.warmup):
                loss = self.module(*static)
                torch.autograd.grad(loss, params, allow_unused=True)
                del loss
        torch.cuda.synchronize()


def _ran_out_of_memory(error: BaseException | None) -> bool:
    """Whether an out-of-memory error is in the chain of exceptions that led to ``error``."""
    while error is not None:
        if isinstance(error, torch.OutOfMemoryError):
            return True
        error = error.__cause__ or error.__context__
    return False


def copy_first_gradients(parameters: Iterable[nn.Parameter]) -> list:
    """Make each parameter's first gradient after ``.grad`` was cleared a copy, so that ``.grad`` never shares
    memory with a buffer that a later backward overwrites (a replayed graph's gradient outputs). Returns the
    hook handles."""
    return [p.register_hook(functools.partial(_copy_if_first, p)) for p in parameters if p.requires_grad]


def _copy_if_first(parameter: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
    # Later gradients are added into .grad, the copy, in place: they need none.
    return grad.clone() if parameter.grad is None else grad


def _autocast_without_cache():
    enabled = torch.is_autocast_enabled("cuda")
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=enabled, cache_enabled=False)
