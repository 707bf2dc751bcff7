"""The evaluation during training: every ``eval.every_n_steps`` optimizer steps, into run_dir/eval/stepN/."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from ..checkpoint.convert import run_tokenizer
from ..config.load import recipe_to_dict
from ..config.schema import Recipe
from .suite import evaluate, summary


class LongContextEval(L.Callback):
    def __init__(self, recipe: Recipe, run_dir: Path, tokenizer_spec: str | None):
        self.recipe, self.run_dir, self.tokenizer_spec = recipe, Path(run_dir), tokenizer_spec
        self.every = recipe.eval.every_n_steps

    @classmethod
    def from_recipe(cls, recipe: Recipe, run_dir: Path) -> list["LongContextEval"]:
        """The callback, in a list, when eval.every_n_steps asks for it; an empty list otherwise."""
        if not recipe.eval.every_n_steps:
            return []
        return [cls(recipe, run_dir, run_tokenizer(recipe_to_dict(recipe))[0])]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not step_done or trainer.global_step % self.every != 0:
            return
        # Every rank runs the model (a sharded model needs them all); rank 0 writes the files.
        out = self.run_dir / "eval" / f"step{trainer.global_step:07d}"
        with trainer.precision_plugin.forward_context():
            results = evaluate(pl_module.model, self.recipe, self.tokenizer_spec,
                               out if trainer.is_global_zero else None, step=trainer.global_step)
        for name, value in summary(results).items():
            pl_module.log(name, value, rank_zero_only=True)
