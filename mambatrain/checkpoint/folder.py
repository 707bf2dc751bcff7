"""A run's checkpoints/ folder: step checkpoints, last.ckpt, finding the newest good one, keeping the last K.

Layout: ``stepNNNNNNN.ckpt`` every ``trainer.checkpoint_every_n_steps`` steps and at preemption, each with its
``.done`` marker (see io.py); ``last.ckpt`` is the newest of them (a hard link: no second write) and, at the
end of a run, the final state.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .io import CheckpointError, fsync_dir, is_temp, marker_path, read_marker, temp_path, verify, write_marker

log = logging.getLogger("mambatrain")

LAST = "last.ckpt"
STEP_PATTERN = re.compile(r"step(\d+)\.ckpt")


def step_name(step: int) -> str:
    return f"step{step:07d}.ckpt"


@dataclass
class Candidate:
    path: Path
    step: int  # from the marker (last.ckpt) or the name (step files); -1 when unknown


def candidates(folder: Path) -> list[Candidate]:
    """Checkpoint files in ``folder``, newest first (higher step; at equal steps a step file before last.ckpt,
    since a step file is written inside the training loop, where Lightning resumes exactly)."""
    found = []
    for path in folder.glob("*.ckpt") if folder.is_dir() else ():
        if is_temp(path) or not path.is_file():
            continue
        match = STEP_PATTERN.fullmatch(path.name)
        if match:
            found.append(Candidate(path, int(match.group(1))))
        elif path.name == LAST:
            marker = read_marker(path) or {}
            found.append(Candidate(path, int(marker.get("global_step") if marker.get("global_step") is not None
                                             else -1)))
    return sorted(found, key=lambda c: (c.step, c.path.name != LAST), reverse=True)


def newest_good(folder: Path) -> Path | None:
    """The newest checkpoint in ``folder`` that passes verification, falling back past damaged ones (logged)."""
    for candidate in candidates(folder):
        if read_marker(candidate.path) is None:
            # Unmarked files in our own folder are writes that never finished (or were killed while marking).
            log.warning("skipping %s: no completion marker (its write did not finish)", candidate.path)
            continue
        try:
            verify(candidate.path)
        except CheckpointError as error:
            log.warning("skipping %s", error)
            continue
        return candidate.path
    return None


def publish_last(path: Path) -> None:
    """Make ``last.ckpt`` (and its marker) the checkpoint just written at ``path``, atomically.

    A hard link costs no second write; where the filesystem has none, the file is copied durably instead.
    """
    last = path.with_name(LAST)
    marker = read_marker(path)
    if marker is None:
        raise CheckpointError(f"{path}: cannot publish as {LAST}, it has no completion marker")
    marker_path(last).unlink(missing_ok=True)
    tmp = temp_path(last)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, last)
    write_marker(last, marker["bytes"], marker["sha256"], marker.get("global_step"))
    fsync_dir(path.parent)


def prune(folder: Path, keep: int, current_step: int) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints at or before ``current_step``; returns those deleted."""
    steps = [c for c in candidates(folder) if c.path.name != LAST and c.step <= current_step]
    removed = []
    for candidate in steps[keep:]:
        # Marker first: a crash in between leaves an unmarked file (never trusted), not a marker without a file.
        marker_path(candidate.path).unlink(missing_ok=True)
        candidate.path.unlink(missing_ok=True)
        removed.append(candidate.path)
    return removed


def tidy(folder: Path, current_step: int) -> None:
    """Housekeeping when training (re)starts at ``current_step``, run by global rank 0 only.

    Deletes what killed writes left behind: temporary files, and unmarked checkpoints newer than
    ``current_step``. Moves complete checkpoints newer than ``current_step`` into ``superseded-<time>/``: they
    belong to a timeline this run abandoned (resumed by hand from an older checkpoint, or past a damaged one),
    and left in place, a later ``--resume auto`` would jump back to them.
    """
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if is_temp(path):
            path.unlink(missing_ok=True)
    newer = [c.path for c in candidates(folder) if c.step > current_step]
    unfinished = [p for p in newer if read_marker(p) is None]
    for path in unfinished:
        path.unlink(missing_ok=True)
    abandoned = [p for p in newer if p not in unfinished]
    if abandoned:
        aside = folder / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(exist_ok=True)
        for path in abandoned:
            for item in (path, marker_path(path)):
                if item.exists():
                    os.replace(item, aside / item.name)
        log.warning("resumed at step %d: moved %d newer checkpoints of an abandoned timeline to %s",
                    current_step, len(abandoned), aside)
    if newer:
        fsync_dir(folder)
