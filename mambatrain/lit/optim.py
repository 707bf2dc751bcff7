"""AdamW with decay only on matrices and embeddings, and warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config.schema import OptimizerConfig, SchedulerConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # Vectors (norm weights, biases, D, dt bias) and A_log must not be pulled towards zero.
        skip = param.ndim < 2 or getattr(param, "_no_weight_decay", False)
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, scheduler: SchedulerConfig, max_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``."""
    if step < scheduler.warmup_steps:
        return (step + 1) / scheduler.warmup_steps
    if scheduler.kind == "constant":
        return 1.0
    decay_steps = max(1, max_steps - scheduler.warmup_steps)
    progress = min(1.0, (step - scheduler.warmup_steps) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return scheduler.min_lr_ratio + (1 - scheduler.min_lr_ratio) * cosine


def build_optimizer(model: nn.Module, optimizer: OptimizerConfig, scheduler: SchedulerConfig, max_steps: int,
                    fused: bool = True):
    """AdamW and its schedule. ``fused``: one kernel updates every parameter (CUDA and CPU) instead of launches per
    tensor group; the caller turns it off under a gradient scaler (a fused AdamW unscales inside its step)."""
    groups = parameter_groups(model, weight_decay=optimizer.weight_decay)
    opt = torch.optim.AdamW(groups, lr=optimizer.lr, betas=(optimizer.beta1, optimizer.beta2), eps=optimizer.eps,
                            fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, scheduler, max_steps))
    return opt, sched
