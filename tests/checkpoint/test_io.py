"""Checkpoint files are complete and marked, or never trusted; damaged ones fail with one line naming the file."""

import json
import os

import pytest
import torch

from mambatrain.checkpoint import io
from mambatrain.checkpoint.folder import LAST, candidates, newest_good, prune, publish_last, step_name, tidy
from mambatrain.checkpoint.io import AtomicCheckpointIO, CheckpointError, atomic_save, marker_path, verify


def fake_checkpoint(step: int) -> dict:
    return {"state_dict": {"w": torch.full((64,), float(step))}, "global_step": step,
            "hyper_parameters": {"recipe": {"model": {}}}}


def save_steps(folder, *steps):
    for step in steps:
        atomic_save(fake_checkpoint(step), folder / step_name(step))


def test_atomic_save_writes_file_and_marker_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "step0000007.ckpt"
    atomic_save(fake_checkpoint(7), path)
    marker = json.loads(marker_path(path).read_text())
    assert marker["bytes"] == path.stat().st_size and marker["global_step"] == 7
    assert verify(path) == marker
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000007.ckpt", "step0000007.ckpt.done"]
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 7


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / LAST
    atomic_save(fake_checkpoint(1), path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # stands in for a kill arriving mid-write

    monkeypatch.setattr(io.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(fake_checkpoint(2), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # The old bytes are intact, but the marker was withdrawn before the new write began: not trusted.
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert newest_good(tmp_path) is None


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "incomplete checkpoint"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"x"), "corrupt checkpoint"),
])
def test_damaged_marked_checkpoint_fails_with_one_line(tmp_path, damage, message):
    path = tmp_path / "step0000003.ckpt"
    atomic_save(fake_checkpoint(3), path)
    damage(path)
    with pytest.raises(CheckpointError) as error:
        verify(path)
    assert str(error.value).startswith(f"{path}: {message}") and "\n" not in str(error.value)


def test_unmarked_truncated_and_foreign_files_are_refused(tmp_path):
    truncated = tmp_path / "copied.ckpt"
    torch.save(fake_checkpoint(3), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a complete PyTorch checkpoint"):
        verify(truncated)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a complete PyTorch checkpoint"):
        verify(text)
    foreign = tmp_path / "weights.ckpt"
    torch.save({"embedding.weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        AtomicCheckpointIO().load_checkpoint(foreign)
    other_lightning = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "global_step": 5, "hyper_parameters": {"lr": 1}}, other_lightning)
    with pytest.raises(CheckpointError, match="not a mambatrain checkpoint"):
        AtomicCheckpointIO().load_checkpoint(other_lightning)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        verify(tmp_path / "missing.ckpt")


def test_newest_good_falls_back_past_damaged_and_unmarked_files(tmp_path):
    save_steps(tmp_path, 10, 20, 30, 40)
    newest = tmp_path / step_name(40)
    newest.write_bytes(newest.read_bytes()[:-10])  # cut short after its marker was written
    os.remove(marker_path(tmp_path / step_name(30)))  # killed between the rename and the marker
    (tmp_path / ".step0000050.ckpt.123.tmp").write_bytes(b"killed mid-write")
    assert newest_good(tmp_path) == tmp_path / step_name(20)
    assert newest_good(tmp_path / "nothing-here") is None


def test_publish_last_and_prune_keep_the_newest(tmp_path):
    save_steps(tmp_path, 1, 2, 3, 4)
    publish_last(tmp_path / step_name(4))
    assert verify(tmp_path / LAST)["global_step"] == 4
    assert prune(tmp_path, keep=2, current_step=4) == [tmp_path / step_name(2), tmp_path / step_name(1)]
    assert [c.path.name for c in candidates(tmp_path)] == [step_name(4), LAST, step_name(3)]
    assert not marker_path(tmp_path / step_name(1)).exists()
    # last.ckpt is a hard link: removing the step file it came from leaves it whole.
    prune(tmp_path, keep=0, current_step=4)
    assert newest_good(tmp_path) == tmp_path / LAST


def test_tidy_sets_aside_an_abandoned_timeline_and_removes_unfinished_writes(tmp_path):
    save_steps(tmp_path, 3, 6, 9)
    publish_last(tmp_path / step_name(9))
    (tmp_path / ".step0000012.ckpt.99.tmp").write_bytes(b"x")  # killed while writing
    (tmp_path / step_name(15)).write_bytes(b"y")  # killed before its marker
    tidy(tmp_path, current_step=3)  # resumed by hand from step 3
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [step_name(3)]
    aside, = tmp_path.glob("superseded-*")
    assert sorted(p.name for p in aside.glob("*.ckpt")) == [LAST, step_name(6), step_name(9)]
    assert not list(tmp_path.glob(".*"))
