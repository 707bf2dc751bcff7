"""The recipe's data section -> a LightningDataModule whose position survives a resume.

The data position is the number of micro-batches consumed; it is saved in each
checkpoint (``state_dict``) and a resumed run starts its stream there, so its
batches are exactly those an uninterrupted run would have seen.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from ..config.schema import Recipe
from .mqar import MQARBatches

VALIDATION_SEED_OFFSET = 7_777_777


class RecipeDataModule(L.LightningDataModule):
    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        self.start_batch = 0

    def _batches_per_step(self) -> int:
        return self.recipe.trainer.accumulate_grad_batches

    def _dataset(self, num_batches: int, seed: int, rank: int, world: int, batch_size: int) -> MQARBatches:
        data = self.recipe.data
        return MQARBatches(num_batches, batch_size, data.seq_len, self.recipe.model.vocab_size,
                           data.mqar.num_kv_pairs, seed, rank, world)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        data = self.recipe.data
        rank, world = self._rank_world()
        total = self.recipe.trainer.max_steps * self._batches_per_step()
        dataset = self._dataset(total, data.mqar.train_samples_seed, rank, world, data.batch_size)
        remaining = Subset(dataset, range(min(self.start_batch, total), total))
        return self._loader(remaining)

    def val_dataloader(self) -> DataLoader:
        data = self.recipe.data
        rank, world = self._rank_world()
        batches = max(1, data.mqar.val_samples // (data.batch_size * world))
        seed = data.mqar.train_samples_seed + VALIDATION_SEED_OFFSET
        return self._loader(self._dataset(batches, seed, rank, world, data.batch_size))

    def _loader(self, dataset) -> DataLoader:
        workers = self.recipe.data.num_workers
        # batch_size=None: the dataset yields whole batches, in index order, from any number of workers.
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def state_dict(self) -> dict:
        # Checkpoints are written at optimizer-step boundaries, so this counts exactly the batches trained on
        # (Lightning's prefetched next batch is not counted).
        step = self.trainer.global_step if self.trainer is not None else 0
        return {"batches_consumed": step * self._batches_per_step()}

    def load_state_dict(self, state: dict) -> None:
        self.start_batch = int(state["batches_consumed"])
