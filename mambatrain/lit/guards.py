"""Numerical guards: skip optimizer steps with a NaN/Inf loss or gradient, stop after too many in a row, and log
the SSM's step sizes and decay rates.

A skipped step leaves weights and optimizer state untouched (every gradient is dropped before AdamW sees it);
the step still counts, so the schedule, the data position and checkpoints stay aligned with an unskipped run.
After ``trainer.max_consecutive_nonfinite`` skipped steps in a row the run stops with one line naming the step,
the data position and the first module whose output went non-finite, found by re-running the offending
micro-batch with forward hooks (armed only then: they cost nothing while training is healthy).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import MAMBA

log = logging.getLogger("mambatrain")


class NonFiniteStop(SystemExit):
    """The run cannot go on; the message is printed as the process exits with status 1 (no traceback)."""


def _nonfinite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return any(_nonfinite(v) for v in value)
    return False


def first_nonfinite_output(model: nn.Module, run) -> str | None:
    """Name of the first module (in execution order) whose output holds a NaN/Inf while ``run()`` executes.

    Submodules finish before their parents, so the answer is the innermost module where it started.
    """
    first: list[str] = []

    def watch(name):
        def hook(module, inputs, output):
            if not first and _nonfinite(output):
                first.append(name)
        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in model.named_modules() if name]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return first[0] if first else None


def first_nonfinite_gradient(model: nn.Module) -> str | None:
    for name, param in model.named_parameters():
        if param.grad is not None and _nonfinite(param.grad):
            return name
    return None


def _describe_module(model: nn.Module, name: str) -> str:
    match = re.match(r"blocks\.(\d+)", name)
    if match and hasattr(model, "blocks"):
        kind = model.blocks[int(match.group(1))].kind
        return f"{name} (layer {match.group(1)}, {'Mamba' if kind == MAMBA else 'attention'})"
    return name


class NonFiniteGuard:
    """Owned by the LightningModule: ``observe`` each micro-batch's loss, ``check`` once per optimizer step."""

    def __init__(self, max_consecutive: int, check_gradients: bool = True):
        self.max_consecutive = max_consecutive
        # Under 16-mixed the GradScaler skips steps with overflowing gradients itself (and lowers the scale):
        # those are routine there, so only the loss is watched.
        self.check_gradients = check_gradients
        self.skipped = 0  # steps skipped in the whole run, restored on resume
        self.consecutive = 0
        self._micro_batches: list[tuple[Any, torch.Tensor]] = []  # (batch, loss is finite) of the current step

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = state.get("skipped", 0), state.get("consecutive", 0)

    def observe(self, loss: torch.Tensor, batch: Any) -> None:
        # Kept until the step ends (token ids only, small) so that a bad micro-batch can be re-run; no host sync.
        self._micro_batches.append((batch, torch.isfinite(loss.detach())))

    def check(self, module: L.LightningModule, grad_norm: torch.Tensor | None) -> bool:
        """After the backward passes of a step, before the optimizer: True (and gradients dropped) to skip it."""
        trainer, micro = module.trainer, self._micro_batches
        self._micro_batches = []
        bad = torch.zeros((), device=module.device)
        if micro:
            bad = bad + (~torch.stack([finite for _, finite in micro]).all()).float()
        if self.check_gradients and grad_norm is not None:
            bad = bad + (~torch.isfinite(grad_norm)).float()
        if trainer.world_size > 1:
            # Gradients are identical across ranks after the all-reduce, losses are not: decide together.
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        skip = bool(bad.item() > 0)  # one host sync per optimizer step
        if skip:
            self.skipped += 1
            self.consecutive += 1
            bad_parameter = first_nonfinite_gradient(module.model)
            for param in module.parameters():
                param.grad = None  # AdamW skips parameters without a gradient: no update, no moment change
            log.warning("step %d: %s, optimizer step skipped (%d in a row, %d in all)", trainer.global_step + 1,
                        self._what_was_bad(micro, bad_parameter), self.consecutive, self.skipped)
        else:
            self.consecutive = 0
        module.log("train/skipped_steps", float(self.skipped))
        if skip and self.consecutive >= self.max_consecutive:
            raise NonFiniteStop(self._stop_message(module, micro, bad_parameter))
        return skip

    @staticmethod
    def _what_was_bad(micro: list, bad_parameter: str | None) -> str:
        bad = [i for i, (_, finite) in enumerate(micro) if not bool(finite)]
        if bad:
            which = ", ".join(str(i + 1) for i in bad)
            return (f"non-finite loss in micro-batch{'es' if len(bad) > 1 else ''} {which} of {len(micro)}"
                    if len(micro) > 1 else "non-finite loss")
        if bad_parameter is not None:
            return f"non-finite gradient (first: {bad_parameter})"
        return "non-finite loss or gradient on another rank"

    def _stop_message(self, module: L.LightningModule, micro: list, bad_parameter: str | None) -> str:
        trainer = module.trainer
        step = trainer.global_step + 1  # the step being attempted; global_step counts those done
        finite = [bool(f) for _, f in micro]
        bad_loss = False in finite
        index = finite.index(False) if bad_loss else len(micro) - 1
        # Micro-batches consumed before this one: the datamodule's data position, as a resume would count it.
        datamodule = trainer.datamodule
        consumed = index + (datamodule.batches_consumed(trainer.global_step) if hasattr(datamodule, "batches_consumed")
                            else trainer.global_step * trainer.accumulate_grad_batches)
        origin = self.locate(module, micro[index][0]) if micro else "no micro-batch was recorded"
        if bad_parameter is not None and not origin.startswith("first non-finite output"):
            origin += f"; first non-finite gradient: {bad_parameter}"
        first = step - self.consecutive + 1
        steps = f"step {step}" if first == step else f"steps {first}-{step}"
        return (f"training stopped: {self.consecutive} optimizer steps in a row had a NaN/Inf loss or gradient "
                f"({steps}, each skipped; trainer.max_consecutive_nonfinite: {self.max_consecutive}); at step {step}, "
                f"data position: micro-batch {consumed} of the run "
                f"({'its loss was non-finite' if bad_loss else 'the losses were finite, the gradient was not'}); "
                f"{origin}")

    @staticmethod
    def locate(module: L.LightningModule, batch: dict) -> str:
        """Re-run ``batch`` with forward hooks armed; describe where the first NaN/Inf appeared."""
        model, trainer = module.model, module.trainer
        losses = []

        def run():
            hidden = model(batch["input_ids"], batch.get("seq_idx"))
            losses.append(model.loss(hidden, batch["labels"], module.recipe.trainer.loss_chunk_size))

        with torch.no_grad(), trainer.precision_plugin.forward_context():
            name = first_nonfinite_output(model, run)
        if name is not None:
            return f"first non-finite output: {_describe_module(model, name)}"
        if losses and _nonfinite(losses[0]):
            return "first non-finite output: the loss (output projection + cross-entropy); every layer was finite"
        return "the forward pass was finite when re-run (the NaN/Inf came from the backward pass)"


def ssm_statistics(model: nn.Module) -> dict[str, float]:
    """Per Mamba layer i: mean/max of the step size softplus(dt_bias) and mean/min/max of the decay A = -exp(A_log).

    A collapsing dt or an A running off towards -inf shows up here long before the loss turns NaN.
    """
    stats: dict[str, float] = {}
    for i, block in enumerate(getattr(model, "blocks", [])):
        if getattr(block, "kind", None) != MAMBA:
            continue
        mixer = block.mixer
        dt_bias = mixer.dt_bias if hasattr(mixer, "dt_bias") else mixer.dt_proj.bias
        if dt_bias.numel() == 0 or mixer.A_log.numel() == 0:
            continue  # an FSDP rank holding no part of this layer
        with torch.no_grad():
            dt = F.softplus(dt_bias.float())
            A = -torch.exp(mixer.A_log.float())
        prefix = f"ssm/layer{i}"
        stats.update({f"{prefix}/dt_mean": dt.mean().item(), f"{prefix}/dt_max": dt.max().item(),
                      f"{prefix}/A_mean": A.mean().item(), f"{prefix}/A_min": A.min().item(),
                      f"{prefix}/A_max": A.max().item()})
    return stats


class SSMStatistics(L.Callback):
    """Logs ``ssm_statistics`` every ``every_n_steps`` optimizer steps (on FSDP: rank 0's shard of each layer)."""

    def __init__(self, every_n_steps: int):
        self.every = every_n_steps
        self._step_at_batch_start = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_done = trainer.global_step != self._step_at_batch_start
        if step_done and trainer.global_step % self.every == 0:
            for name, value in ssm_statistics(pl_module.model).items():
                pl_module.log(name, value, rank_zero_only=True)
