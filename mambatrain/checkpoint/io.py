"""Checkpoint files that are either complete or ignored: atomic, durable writes with a completion marker.

A checkpoint ``X.ckpt`` is written to a temporary file beside it (same filesystem, so the rename is atomic),
fsynced, renamed over ``X.ckpt``, and only then announced by ``X.ckpt.done``, a small JSON marker holding its
size, sha256 and step; the folder is fsynced last so the renames survive a power cut. A file without a valid
marker is never resumed from silently: a kill at any moment leaves at worst a stray temporary file and the
previous checkpoints intact.

Lightning's own ``TorchCheckpointIO`` serialises into memory and moves the bytes into place without fsync,
so after a crash a checkpoint can exist but be empty or short; ``AtomicCheckpointIO`` replaces it
(``Trainer(plugins=[AtomicCheckpointIO()])``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..config.schema import RecipeError

log = logging.getLogger("mambatrain")

MARKER_SUFFIX = ".done"
TEMP_SUFFIX = ".tmp"
# Chaos testing only (scripts/chaos_resume.py): seconds to wait between writing a checkpoint's temporary file
# and renaming it into place, so that a kill can be aimed at an unfinished write.
WRITE_DELAY_ENV = "MAMBATRAIN_CHECKPOINT_WRITE_DELAY"


class CheckpointError(RecipeError):
    """A checkpoint that cannot be resumed from: truncated, corrupt, or not one of ours. One line, naming the file."""


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + MARKER_SUFFIX)


def temp_path(path: Path) -> Path:
    # Hidden and pid-tagged: never mistaken for a checkpoint, never shared by two writers.
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only file wrapper that hashes and counts the bytes on their way to disk (one pass, no re-read)."""

    def __init__(self, file):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _write_durably(path: Path, write) -> tuple[int, str]:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename over ``path``; returns (size, sha256)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        delay = float(os.environ.get(WRITE_DELAY_ENV) or 0)
        if delay > 0:
            time.sleep(delay)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return writer.size, writer.sha256.hexdigest()


def write_marker(path: Path, size: int, sha256: str, step: int | None) -> None:
    marker = {"file": path.name, "bytes": size, "sha256": sha256, "global_step": step,
              "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_durably(marker_path(path), lambda f: f.write(json.dumps(marker).encode()))


def atomic_save(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write ``checkpoint`` to ``path`` so that it is either complete and marked, or not there at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # An old marker must not vouch for the new bytes while they are being replaced.
    marker_path(path).unlink(missing_ok=True)
    size, sha256 = _write_durably(path, lambda f: torch.save(checkpoint, f))
    write_marker(path, size, sha256, checkpoint.get("global_step"))
    fsync_dir(path.parent)


def read_marker(path: Path) -> dict | None:
    """The completion marker of ``path``, or None when it has none (or an unreadable one)."""
    try:
        marker = json.loads(marker_path(path).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and {"bytes", "sha256"} <= marker.keys() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


_verified: dict[str, tuple[int, int]] = {}  # resolved path -> (size, mtime_ns) of a file already hashed


def verify(path: str | Path) -> dict | None:
    """Check that ``path`` is a whole checkpoint; returns its marker (None for an unmarked but intact file).

    With a marker: the size and sha256 must match it. Without one (a file copied by hand, or written before
    markers existed): the zip container PyTorch writes must be complete and pass its CRC checks.
    Raises ``CheckpointError`` naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    stat = path.stat()
    marker = read_marker(path)
    key = str(path.resolve())
    if _verified.get(key) == (stat.st_size, stat.st_mtime_ns):
        return marker
    if marker is not None:
        if stat.st_size != marker["bytes"]:
            raise CheckpointError(f"{path}: incomplete checkpoint, {stat.st_size} bytes where its completion marker "
                                  f"says {marker['bytes']} (the write was interrupted or the file was cut short)")
        if _sha256(path) != marker["sha256"]:
            raise CheckpointError(f"{path}: corrupt checkpoint, its sha256 differs from its completion marker")
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as error:
            raise CheckpointError(f"{path}: not a complete PyTorch checkpoint (truncated, or not a checkpoint "
                                  f"file at all: {error})") from None
        if bad is not None:
            raise CheckpointError(f"{path}: corrupt checkpoint, entry {bad} fails its CRC check")
        log.warning("%s has no completion marker (%s): its contents pass the zip checks, resuming from it",
                    path, marker_path(path).name)
    _verified[key] = (stat.st_size, stat.st_mtime_ns)
    return marker


def check_contents(checkpoint: Any, path: str | Path) -> None:
    """A loaded file is a mambatrain training checkpoint, not someone else's state dict."""
    if not isinstance(checkpoint, dict) or not {"state_dict", "global_step"} <= checkpoint.keys():
        raise CheckpointError(f"{path}: not a training checkpoint (a Lightning checkpoint holds state_dict and "
                              f"global_step; this file holds {_describe(checkpoint)})")
    if "recipe" not in (checkpoint.get("hyper_parameters") or {}):
        raise CheckpointError(f"{path}: not a mambatrain checkpoint (it has no recipe among its hyper_parameters)")


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        keys = list(value)[:5]
        return f"keys {', '.join(map(str, keys))}{', ...' if len(value) > 5 else ''}"
    return type(value).__name__


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic, durable, marked writes and verified reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        verify(path)
        try:
            checkpoint = torch.load(path, map_location=map_location or (lambda storage, loc: storage),
                                    weights_only=bool(weights_only))
        except Exception as error:  # torch raises several types for a damaged or foreign file
            raise CheckpointError(f"{path}: cannot be read as a checkpoint "
                                  f"({' '.join(str(error).split())[:200]})") from None
        check_contents(checkpoint, path)
        return checkpoint

    def remove_checkpoint(self, path) -> None:
        # Marker first: a crash in between leaves an unmarked file, which is never trusted, not a dangling marker.
        marker_path(Path(path)).unlink(missing_ok=True)
        Path(path).unlink(missing_ok=True)
