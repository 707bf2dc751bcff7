"""The LightningModule: next-token loss, metrics, optimizer, and RNG (and carried Mamba) state in checkpoints."""

from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import torch

from ..config.load import recipe_to_dict
from ..config.schema import Recipe
from ..distributed import context_parallel_training as cpt
from ..models.graphed import GraphedLoss
from ..models.lm import LanguageModel
from ..models.loss import IGNORE_INDEX
from ..models.windowed import windowed_evaluation, windowed_loss
from .carried import CarriedState
from .guards import NonFiniteGuard
from .optim import build_optimizer


def collect_rng_states() -> dict:
    """Every generator's state, as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                        cached), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class LanguageModelModule(L.LightningModule):
    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        self.save_hyperparameters({"recipe": recipe_to_dict(recipe)})
        self.model = LanguageModel(recipe.model)
        self.model.checkpoint_kinds = set(recipe.trainer.activation_checkpointing)
        self._rng_to_restore: dict | None = None
        self.context_parallel = None  # this rank's ContextParallel group (setup) when trainer.context_parallel > 1
        self.carried = CarriedState() if recipe.trainer.carry_state else None  # training rows' Mamba state
        self.guard = NonFiniteGuard(recipe.trainer.max_consecutive_nonfinite,
                                    check_gradients=recipe.trainer.precision != "16-mixed")
        # trainer.cuda_graph: the training loss replayed from CUDA graphs, built at the first batch on a GPU
        self.graphed: GraphedLoss | None = None
        self._step_losses: tuple[int, torch.Tensor | float, int] = (-1, 0.0, 0)  # (step, loss sum, micro-batches)

    def forward(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, seq_idx)

    def setup(self, stage: str) -> None:
        if self.context_parallel is None:  # process groups exist now; fit then validate calls this twice
            self.context_parallel = cpt.build_context_parallel(self.recipe.trainer.context_parallel)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Every rank of a context-parallel group got the whole batch; each keeps its slice of the length.
        return cpt.shard_batch(batch, self.context_parallel) if self.context_parallel else batch

    def _loss(self, batch: dict, states: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mean loss, and the final hidden states (None when the batch ran window by window).

        ``states``: Mamba state carried in from the previous micro-batch (trainer.carry_state), updated in place.
        """
        trainer, ids = self.recipe.trainer, batch["input_ids"]
        if self.context_parallel is not None:
            return cpt.loss_and_hidden(self.model, batch, self.context_parallel, trainer.loss_chunk_size)
        if self._windowed(ids):
            loss = windowed_loss(self.model, ids, batch["labels"], batch.get("seq_idx"), trainer.sequence_window,
                                 trainer.loss_chunk_size)
            return loss, None
        hidden = self.model(ids, batch.get("seq_idx"), states)
        return self.model.loss(hidden, batch["labels"], trainer.loss_chunk_size), hidden

    def _windowed(self, ids: torch.Tensor) -> bool:
        """Whether this batch runs window by window (trainer.sequence_window, shorter than the batch)."""
        window = self.recipe.trainer.sequence_window
        return self.context_parallel is None and window is not None and ids.shape[1] > window

    def _graphed_loss(self, batch: dict) -> torch.Tensor:
        if self.graphed is None:
            self.graphed = GraphedLoss(self.model, lambda model, ids, labels, seq_idx: self._loss(
                {"input_ids": ids, "labels": labels, "seq_idx": seq_idx})[0],
                accumulate_gradients=self.recipe.trainer.accumulate_grad_batches > 1)
        return self.graphed(batch["input_ids"], batch["labels"], batch.get("seq_idx"))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.recipe.trainer.cuda_graph and batch["input_ids"].is_cuda:
            loss = self._graphed_loss(batch)
        elif self.carried is None:
            loss, _ = self._loss(batch)
        else:  # validation never touches these: it runs from zero state
            ids = batch["input_ids"]
            loss, _ = self._loss(batch, self.carried.for_batch(self.model, ids.shape[0], ids.device))
            self.carried.detach_()
        self.guard.observe(loss, batch)
        step_loss = self._step_loss(loss.detach())
        self.log("train/loss", step_loss, prog_bar=True)
        self.log("train/ppl", torch.exp(step_loss.clamp(max=20)))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss * cpt.backward_scale(self.context_parallel)

    def _step_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Mean loss of this optimizer step's micro-batches so far. Lightning writes a step's metrics after its
        last micro-batch, so train/loss is the loss of the whole accumulated batch, not of its last micro-batch."""
        step, total, count = self._step_losses
        if step != self.global_step:  # the first micro-batch of a step
            step, total, count = self.global_step, 0.0, 0
        self._step_losses = (step, total + loss, count + 1)
        return (total + loss) / (count + 1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ids, labels, trainer = batch["input_ids"], batch["labels"], self.recipe.trainer
        targets = labels != IGNORE_INDEX
        if self._windowed(ids):  # no hidden states for the whole batch: predictions are counted window by window
            loss, correct = windowed_evaluation(self.model, ids, labels, batch.get("seq_idx"), trainer.sequence_window,
                                                trainer.loss_chunk_size)
        else:
            loss, hidden = self._loss(batch)
            # Accuracy over labelled positions only: logits for those tokens, never the whole (B, T, vocab).
            correct = (self.model.logits(hidden[targets]).argmax(-1) == labels[targets]).sum()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss.clamp(max=20)), sync_dist=True)
        # Counted over the context-parallel group: a slice may hold no labelled token.
        correct, count = cpt.group_sum(torch.stack([correct, targets.sum()]), self.context_parallel)
        accuracy = correct.float() / count
        self.log("val/accuracy", accuracy, prog_bar=True, sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        norm = gradient_norm(grads, self.trainer.strategy if self._sharded() else None)
        if norm is not None:
            self.log("train/grad_norm", norm)
        skip = self.guard.check(self, norm)  # drops every gradient (skips the step) when the loss or norm is NaN/Inf
        if not skip and norm is not None and self.recipe.trainer.gradient_clip > 0:
            clip_gradients(grads, norm, self.recipe.trainer.gradient_clip)

    def _sharded(self) -> bool:
        return self._trainer is not None and self.recipe.trainer.strategy == "fsdp" and self.trainer.world_size > 1

    def configure_optimizers(self):
        # Fused AdamW, except under fp16's gradient scaler: a fused step unscales the gradients itself, after the
        # hook above has measured and clipped them (Lightning unscales them before it for an unfused one).
        optimizer, scheduler = build_optimizer(self.model, self.recipe.optimizer, self.recipe.scheduler,
                                               self.recipe.trainer.max_steps,
                                               fused=self.recipe.trainer.precision != "16-mixed")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # A Lightning checkpoint holds no RNG state by itself; a resumed run must draw the same numbers.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = collect_rng_states()
        checkpoint["nonfinite_guard"] = self.guard.state_dict()
        if self.carried is not None:
            checkpoint["carried_state"] = self.carried.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Restored at the first training batch: building dataloaders in between draws random numbers.
        self._rng_to_restore = checkpoint.get("rng_states")
        self.guard.load_state_dict(checkpoint.get("nonfinite_guard", {}))
        if self.carried is not None and self._trainer is not None:  # resuming a fit, not loading weights to use
            self.carried.load_state_dict(checkpoint.get("carried_state"), self.trainer.global_rank,
                                         self.trainer.world_size)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


def gradient_norm(grads: list[torch.Tensor], sharded_over=None) -> torch.Tensor | None:
    """The L2 norm of all gradients, in a few fused launches (not one per tensor); ``sharded_over``: the strategy
    whose ranks each hold a disjoint shard of the gradients (FSDP), whose squared norms add up."""
    if not grads:
        return None
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    if sharded_over is not None:
        norm = sharded_over.reduce(norm.square(), reduce_op="sum").sqrt()
    return norm


def clip_gradients(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scales the gradients so their norm is at most ``max_norm``, without a host sync.

    Done here rather than by Lightning's ``gradient_clip_val``: Lightning refuses to clip for a fused optimizer under
    mixed precision and for FSDP, and this reuses the norm the step logs and checks anyway."""
    torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 20.0))
