"""recipe -> datamodule + LightningModule + Trainer -> fit -> checkpoints and logs."""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from . import finetune
from .checkpoint.callback import StepCheckpoint
from .checkpoint.folder import LAST, newest_good
from .checkpoint.io import AtomicCheckpointIO, verify
from .checkpoint.preemption import PreemptionSignals
from .config.load import recipe_to_yaml
from .config.schema import LoggingConfig, Recipe, RecipeError
from .data.datamodule import RecipeDataModule
from .distributed.strategy import (
    RUN_DIR_ENV, build_strategy, data_parallel_size, global_batch, global_rank, release_process_group,
)
from .eval.callback import LongContextEval
from .lit.callbacks import ThroughputMonitor, ValidateAtLastStep
from .lit.guards import SSMStatistics
from .lit.module import LanguageModelModule
from .plan import training_flops_per_token
from .records import write_environment

log = logging.getLogger("mambatrain")


def _versions(base: Path) -> list[Path]:
    found = [p for p in base.glob("version_*") if re.fullmatch(r"version_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _next_version(base: Path) -> Path:
    versions = _versions(base)
    return base / f"version_{int(versions[-1].name.split('_')[1]) + 1 if versions else 0}"


def resolve_run(logging_config: LoggingConfig, resume: str | None) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None for a fresh run).

    A fresh run takes the next ``version_N`` under root_dir/run_name (or the directory a launcher named).
    ``resume="auto"`` continues the newest checkpoint that verifies, in the newest version that has one,
    falling back past damaged or unfinished files, and starts fresh when there is none; ``"last"`` is the
    same but insists on a checkpoint; a path continues that file's run, and fails if the file is damaged.
    """
    base = Path(logging_config.root_dir) / logging_config.run_name
    # Ranks started by a launcher share the directory rank 0 chose (or the launcher named).
    launcher_dir = Path(os.environ[RUN_DIR_ENV]) if os.environ.get(RUN_DIR_ENV) else None
    if resume is None:
        return launcher_dir or _next_version(base), None
    if resume in ("auto", "last"):
        for run_dir in [launcher_dir] if launcher_dir else reversed(_versions(base)):
            checkpoint = newest_good(run_dir / "checkpoints")
            if checkpoint is not None:
                return run_dir, checkpoint
        where = launcher_dir or f"{base}/version_*"
        if resume == "last":
            raise RecipeError(f"--resume last: no complete checkpoint under {where}/checkpoints; start a fresh run "
                              f"without --resume (or with --resume auto), or check logging.root_dir and run_name")
        log.info("--resume auto: no complete checkpoint under %s/checkpoints, starting a fresh run", where)
        return launcher_dir or _next_version(base), None
    checkpoint = Path(resume)
    verify(checkpoint)  # a CheckpointError (one line naming the file) for a missing, truncated or corrupt file
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


def build_trainer(recipe: Recipe, run_dir: Path, signals: PreemptionSignals | None = None) -> L.Trainer:
    t = recipe.trainer
    checkpoints = StepCheckpoint(run_dir / "checkpoints", t.checkpoint_every_n_steps, t.keep_last_checkpoints,
                                 signals)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(recipe),
        precision=_precision(recipe),
        # No gradient_clip_val: the module clips (trainer.gradient_clip) with the norm it logs, for every strategy.
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        val_check_interval=t.val_every_n_steps * t.accumulate_grad_batches, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        # Our datasets shard by rank themselves: no DistributedSampler.
        num_sanity_val_steps=0, use_distributed_sampler=False,
        logger=build_logger(recipe, run_dir), default_root_dir=str(run_dir),
        callbacks=[ThroughputMonitor.from_recipe(recipe), SSMStatistics(t.log_every_n_steps), TQDMProgressBar(),
                   *LongContextEval.from_recipe(recipe, run_dir),
                   *([ValidateAtLastStep()] if t.strategy == "fsdp" else []),
                   checkpoints],  # last: a preemption exit comes after the other callbacks have logged the step
        # Atomic, fsynced, marked checkpoint files; StepCheckpoint replaces Lightning's ModelCheckpoint.
        plugins=[AtomicCheckpointIO()], enable_checkpointing=False,
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
    # The module's on_after_batch_transfer (context-parallel slices) runs beside the datamodule's hooks, as meant.
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
    # On resume the run's own folders are reused on purpose; Lightning's CSV logger appends, it deletes nothing.
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")


def check_accelerator(recipe: Recipe) -> None:
    """GPU settings on a machine whose torch sees no GPU, or more GPUs than it sees: refused here, before anything
    is built or written (Lightning would refuse them with a traceback once the data and the model exist)."""
    t = recipe.trainer
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if t.accelerator != "cpu" and t.devices > visible:
            raise RecipeError(f"trainer.devices: {t.devices}, but torch sees {visible} GPU(s) on this machine; set "
                              f"trainer.devices to {visible} or fewer (or check CUDA_VISIBLE_DEVICES)")
        return
    if t.accelerator == "gpu":
        raise RecipeError("trainer.accelerator: gpu, but torch sees no CUDA device on this machine; use auto or cpu "
                          "here (or check the driver and CUDA_VISIBLE_DEVICES)")
    if t.strategy == "fsdp":
        raise RecipeError("trainer.strategy: fsdp needs GPUs and torch sees no CUDA device on this machine; use ddp "
                          "here (it runs on the CPU)")


def fit(recipe: Recipe, resume: str | None = None) -> dict[str, float]:
    """Train as the recipe says; returns the final validation metrics.

    A preemption signal (SIGTERM, SIGUSR1) ends training early with a checkpoint and raises ``Preempted``, a
    ``SystemExit`` with status 75 (see checkpoint/preemption.py); ``NonFiniteStop`` (status 1) ends a run
    whose loss stays NaN/Inf.
    """
    check_accelerator(recipe)
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
    fresh = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    if global_rank() == 0:
        (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    try:
        # Installed before anything slow, so that a signal during start-up is kept for the first step boundary.
        with PreemptionSignals() as signals:
            metrics = _train(run_dir, checkpoint, recipe, signals)
    except RecipeError:
        # A recipe the data refused (a missing column, an empty source): the version folder it made holds
        # nothing to resume, and left behind it would shift the next run's version number.
        if fresh and global_rank() == 0 and not any((run_dir / "checkpoints").glob("*")):
            shutil.rmtree(run_dir, ignore_errors=True)
            try:
                run_dir.parent.rmdir()  # the run name's folder, when this was its only version
            except OSError:
                pass
        raise
    # After a normal end only: after an error another rank may still be in a collective, and tearing NCCL
    # down alone can hang where the error would have ended the process.
    release_process_group()
    return metrics


def _train(run_dir: Path, checkpoint: Path | None, recipe: Recipe, signals: PreemptionSignals) -> dict[str, float]:
    datamodule = RecipeDataModule(recipe)
    module = LanguageModelModule(recipe)
    finetune.prepare(module.model, recipe, resuming=checkpoint is not None)
    log.info(describe(recipe, module))
    trainer = build_trainer(recipe, run_dir, signals)
    if global_rank() == 0:
        write_environment(run_dir, trainer, checkpoint)
    log.info("device: %s x%d, precision %s", trainer.accelerator.__class__.__name__.replace("Accelerator", "").lower(),
             trainer.num_devices, trainer.precision)
    log.info("run directory: %s%s", run_dir, f" (resuming from {checkpoint})" if checkpoint else "")
    log.info("global batch: %d sequences x %d tokens (micro batch %d x accumulation %d x %d data-parallel ranks)%s",
             global_batch(recipe), recipe.data.seq_len, recipe.data.batch_size,
             recipe.trainer.accumulate_grad_batches, data_parallel_size(recipe),
             f", each sequence split over {recipe.trainer.context_parallel} context-parallel ranks"
             if recipe.trainer.context_parallel > 1 else "")
    with warnings.catch_warnings():
        _quiet_known_warnings()
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint else None)
        trainer.save_checkpoint(run_dir / "checkpoints" / LAST)
        if recipe.trainer.strategy == "fsdp":  # validated inside fit, at the last step (ValidateAtLastStep)
            results = [{k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}]
        else:
            results = trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if metrics:
        summary = ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in sorted(metrics.items()))
        log.info("final validation after %d steps: %s", trainer.global_step, summary)
    return metrics
