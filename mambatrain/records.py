"""Run records: ``environment.json`` in each run directory says what a session ran on.

Versions, device, command line and git commit of the code; a resumed run appends its own session
and keeps the earlier ones, so the record covers the whole run.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit of the mambatrain sources, with "-dirty" for uncommitted changes; None outside a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty else "")


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_environment(run_dir: Path, trainer: L.Trainer, checkpoint: Path | None) -> None:
    """``environment.json``: what this session ran on; the records of earlier sessions (resumes) are kept."""
    path = run_dir / "environment.json"
    earlier = []
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
            earlier = previous.pop("earlier_sessions", []) + [previous]
        except ValueError:
            pass
    cuda = torch.cuda.is_available() and trainer.accelerator.__class__.__name__.startswith("CUDA")
    record = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(), "host": socket.gethostname(), "resumed_from": str(checkpoint) if checkpoint else None,
        "git_commit": _git_commit(), "python": platform.python_version(), "torch": torch.__version__,
        "lightning": L.__version__, "triton": _package_version("triton"), "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(trainer.strategy.root_device) if cuda else f"CPU: {_cpu_name()}",
        "devices": trainer.num_devices, "num_nodes": trainer.num_nodes, "world_size": trainer.world_size,
        "precision": trainer.precision, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "earlier_sessions": earlier,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
