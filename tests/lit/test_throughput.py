"""train/tokens_per_sec counts training time only: a validation inside a logging window is left out."""

import torch

from mambatrain.lit import callbacks
from mambatrain.lit.callbacks import ThroughputMonitor


class _Trainer:
    accumulate_grad_batches, world_size, global_step = 1, 1, 0


class _Module:
    device = torch.device("cpu")

    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def test_validation_inside_a_window_is_not_training_time(monkeypatch):
    clock = iter([0.0, 1.0, 11.0, 12.0])  # window opens, validation starts, validation ends, step 2 ends
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    monitor, trainer, module = ThroughputMonitor(100, 1.0, log_every_n_steps=2), _Trainer(), _Module()
    monitor.on_train_batch_start(trainer, module, None, 0)
    trainer.global_step = 1
    monitor.on_train_batch_end(trainer, module, None, None, 0)  # step 1: inside the window, nothing logged
    monitor.on_validation_start(trainer, module)
    monitor.on_validation_end(trainer, module)
    monitor.on_train_batch_start(trainer, module, None, 1)
    trainer.global_step = 2
    monitor.on_train_batch_end(trainer, module, None, None, 1)
    assert module.logged["train/tokens_per_sec"] == 200 / 2.0  # 12 s of wall time, 10 of them validating


def test_validation_outside_a_window_changes_nothing(monkeypatch):
    clock = iter([0.0, 4.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    monitor, trainer, module = ThroughputMonitor(100, 1.0, log_every_n_steps=1), _Trainer(), _Module()
    monitor.on_validation_start(trainer, module)  # before the first window: no clock read
    monitor.on_validation_end(trainer, module)
    monitor.on_train_batch_start(trainer, module, None, 0)
    trainer.global_step = 1
    monitor.on_train_batch_end(trainer, module, None, None, 0)
    assert module.logged["train/tokens_per_sec"] == 100 / 4.0
