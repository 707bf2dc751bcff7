"""recipe -> datamodule + LightningModule + Trainer -> fit -> checkpoints and logs."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from .config.load import recipe_to_yaml
from .config.schema import LoggingConfig, Recipe, RecipeError
from .data.datamodule import RecipeDataModule
from .distributed.strategy import RUN_DIR_ENV, build_strategy, global_batch, global_rank
from .lit.callbacks import ThroughputMonitor
from .lit.module import LanguageModelModule
from .plan import training_flops_per_token

log = logging.getLogger("mambatrain")
LAST = "last.ckpt"


def _versions(base: Path) -> list[Path]:
    found = [p for p in base.glob("version_*") if re.fullmatch(r"version_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_run(logging_config: LoggingConfig, resume: str | None) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None for a fresh run).

    A fresh run takes the next ``version_N`` under root_dir/run_name. ``resume="last"``
    continues the newest version that holds a checkpoint; a path continues that file's run.
    """
    base = Path(logging_config.root_dir) / logging_config.run_name
    if resume is None and os.environ.get(RUN_DIR_ENV):
        # Ranks started by a launcher share the directory rank 0 chose (or the launcher named).
        return Path(os.environ[RUN_DIR_ENV]), None
    if resume is None:
        versions = _versions(base)
        next_version = int(versions[-1].name.split("_")[1]) + 1 if versions else 0
        return base / f"version_{next_version}", None
    if resume == "last":
        for run_dir in reversed(_versions(base)):
            checkpoint = run_dir / "checkpoints" / LAST
            if checkpoint.is_file():
                return run_dir, checkpoint
        raise RecipeError(f"--resume last: no checkpoint under {base}/version_*/checkpoints/{LAST}; "
                          f"start a fresh run without --resume, or check logging.root_dir and logging.run_name")
    checkpoint = Path(resume)
    if not checkpoint.is_file():
        raise RecipeError(f"--resume {resume}: no such checkpoint file")
    return checkpoint.resolve().parent.parent, checkpoint


def _precision(recipe: Recipe) -> str:
    if recipe.trainer.precision != "auto":
        return recipe.trainer.precision
    on_gpu = recipe.trainer.accelerator == "gpu" or (recipe.trainer.accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_logger(recipe: Recipe, run_dir: Path):
    kind = recipe.logging.logger
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(save_dir=str(run_dir), name="logs", version="")
    if kind == "tensorboard":
        return L.pytorch.loggers.TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard")
    offline = not _wandb_has_credentials() or os.environ.get("WANDB_MODE") == "offline"
    if offline:
        log.info("wandb: no API key configured, logging offline to %s (sync later with `wandb sync`)", run_dir)
    return L.pytorch.loggers.WandbLogger(project=recipe.logging.wandb_project, name=recipe.logging.run_name,
                                         save_dir=str(run_dir), offline=offline)


def build_trainer(recipe: Recipe, run_dir: Path) -> L.Trainer:
    t = recipe.trainer
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}",
                                  auto_insert_metric_name=False, every_n_train_steps=t.checkpoint_every_n_steps,
                                  save_top_k=3, monitor="step", mode="max", save_last=True)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(recipe),
        precision=_precision(recipe),
        max_steps=t.max_steps, gradient_clip_val=t.gradient_clip or None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        val_check_interval=t.val_every_n_steps * t.accumulate_grad_batches, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        # Our datasets shard by rank themselves: no DistributedSampler.
        num_sanity_val_steps=0, use_distributed_sampler=False,
        logger=build_logger(recipe, run_dir), default_root_dir=str(run_dir),
        callbacks=[checkpoints, ThroughputMonitor.from_recipe(recipe), TQDMProgressBar()],
        enable_model_summary=False,
    )


def describe(recipe: Recipe, module: LanguageModelModule) -> str:
    counts = module.model.parameter_counts()
    lines = [f"model: {recipe.model.kind}, pattern {recipe.model.pattern} "
             f"({'Mamba-%d' % recipe.model.mamba.version if 'M' in recipe.model.pattern else 'attention only'})"]
    width = max(len(k) for k in counts)
    for name, count in counts.items():
        lines.append(f"  {name:<{width}}  {count:>14,}")
    flops = training_flops_per_token(recipe.model, recipe.data.seq_len)
    lines.append(f"  training FLOPs/token at length {recipe.data.seq_len:,}: {flops:.3g}")
    return "\n".join(lines)


def _quiet_known_warnings() -> None:
    # Our datamodule restores its own data position, which Lightning cannot see.
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*weights_only.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # On resume the run's own folders are reused on purpose; Lightning's CSV logger appends, it deletes nothing.
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")


def fit(recipe: Recipe, resume: str | None = None) -> dict[str, float]:
    """Train as the recipe says; returns the final validation metrics."""
    run_dir, checkpoint = resolve_run(recipe.logging, resume)
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    inherited = RUN_DIR_ENV in os.environ
    os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the ranks Lightning launches
    try:
        return _fit_in(run_dir, checkpoint, recipe)
    finally:
        if not inherited:
            del os.environ[RUN_DIR_ENV]


def _fit_in(run_dir: Path, checkpoint: Path | None, recipe: Recipe) -> dict[str, float]:
    run_dir.mkdir(parents=True, exist_ok=True)
    if global_rank() == 0:
        (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    datamodule = RecipeDataModule(recipe)
    module = LanguageModelModule(recipe)
    log.info(describe(recipe, module))
    trainer = build_trainer(recipe, run_dir)
    log.info("device: %s x%d, precision %s", trainer.accelerator.__class__.__name__.replace("Accelerator", "").lower(),
             trainer.num_devices, trainer.precision)
    log.info("run directory: %s%s", run_dir, f" (resuming from {checkpoint})" if checkpoint else "")
    log.info("global batch: %d sequences x %d tokens (micro batch %d x accumulation %d x %d data-parallel ranks)",
             global_batch(recipe), recipe.data.seq_len, recipe.data.batch_size,
             recipe.trainer.accumulate_grad_batches, recipe.trainer.devices * recipe.trainer.num_nodes)
    with warnings.catch_warnings():
        _quiet_known_warnings()
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint else None)
        trainer.save_checkpoint(run_dir / "checkpoints" / LAST)
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if metrics:
        summary = ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in sorted(metrics.items()))
        log.info("final validation after %d steps: %s", trainer.global_step, summary)
    return metrics
