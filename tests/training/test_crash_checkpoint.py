"""Checkpoint files survive interrupted saves, full disks and damaged folders."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from difftune.errors import DifftuneError
from difftune.fileio import atomic_folder
from difftune.training import checkpoint as ckpt


def _state(step: int, mb: float = 0.01) -> ckpt.TrainingState:
    n = int(mb * 2**20 / 4)
    return ckpt.TrainingState(step, {"w": torch.full((n,), float(step))}, {"state": {0: {"m": torch.ones(n)}}},
                              {"last_epoch": step}, scaler={"scale": 1024.0})


def _save(root, state: ckpt.TrainingState, info: dict):
    return ckpt.save_checkpoint(root, state.step, state, info)


def test_checkpoint_holds_every_part_and_per_process_rng(tmp_path):
    root = tmp_path / "ck"
    staging = ckpt.begin(root, 7)
    torch.manual_seed(1)
    ckpt.save_process_state(staging, 0)
    expected = torch.rand(3)  # what rank 0's torch RNG produces after the saved point
    torch.manual_seed(2)
    ckpt.save_process_state(staging, 1)  # another process writes its own file before the main process finishes
    folder = ckpt.finish(root, staging, _state(7), {"note": "x"})

    assert folder == root / "step-7" and not staging.exists()
    assert ckpt.verify(folder) is None
    state = ckpt.load_checkpoint(folder, rank=0)
    assert state.step == 7 and state.scheduler == {"last_epoch": 7} and state.scaler == {"scale": 1024.0}
    assert state.info == {"step": 7, "note": "x"}
    ckpt.set_rng_state(state.rng)
    assert torch.equal(torch.rand(3), expected)
    other = ckpt.load_checkpoint(folder, rank=1)
    assert not torch.equal(other.rng["torch"], state.rng["torch"])
    # The manifest covers every process's file, so a damaged rng file is detected.
    (folder / "rng-1.pt").write_bytes(b"x")
    assert ckpt.verify(folder) == "rng-1.pt does not match its checksum"


def test_resaving_a_step_never_leaves_it_missing(tmp_path, monkeypatch):
    """A kill between moving the old step-N aside and renaming the new one in is repaired on resume."""
    root = tmp_path / "ck"
    _save(root, _state(3), {})
    real_replace = os.replace

    def killed_before_renaming_the_new_one_in(src, dst):
        if os.path.basename(src) == ".tmp-step-3":
            raise KeyboardInterrupt("simulated kill")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_renaming_the_new_one_in)
    with pytest.raises(KeyboardInterrupt):
        _save(root, _state(3), {"second": True})
    monkeypatch.setattr(os, "replace", real_replace)

    assert not (root / "step-3").exists() and (root / ".old-step-3").is_dir()
    messages = []
    found = ckpt.find_resumable(root, log=messages.append)
    assert found == root / "step-3" and "restored checkpoint" in messages[0]
    assert ckpt.load_checkpoint(found).step == 3
    assert sorted(p.name for p in root.iterdir()) == ["step-3"]


def test_stale_staging_folders_are_ignored_and_cleaned(tmp_path):
    root = tmp_path / "ck"
    _save(root, _state(1), {})
    half = root / ".tmp-step-2"
    half.mkdir()
    (half / "trainable.safetensors").write_bytes(b"partial")
    (root / "step-3").mkdir()  # a folder without manifest (not written by difftune's save)
    messages = []
    assert ckpt.find_resumable(root, log=messages.append) == root / "step-1"
    assert "step-3 is damaged (no manifest" in messages[0]
    assert not half.exists()


def test_full_disk_keeps_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    _save(root, _state(1), {})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_safetensors", disk_full)
    with pytest.raises(DifftuneError) as caught:
        _save(root, _state(2, mb=3), {})
    message = str(caught.value)
    assert "the disk is full" in message and "step-2" in message and str(root) in message
    assert "about 7.0 MB" in message and "MB free" in message  # 3 MB weights + 3 MB optimizer + 1 MB margin
    assert f"previous checkpoint {root / 'step-1'} is intact" in message
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]  # no partial folder left
    assert ckpt.load_checkpoint(root / "step-1").step == 1


def test_full_disk_while_writing_rng_file(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    _save(root, _state(1), {})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(ckpt.DiskFullError):
        _save(root, _state(2), {})
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]


def test_prune_counts_only_complete_checkpoints(tmp_path):
    root = tmp_path / "ck"
    for step in (1, 2):
        _save(root, _state(step), {})
    (root / "step-3").mkdir()  # damaged newest: must not push the last good one out
    ckpt.prune(root, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-2", "step-3"]
    assert ckpt.find_resumable(root, log=lambda m: None) == root / "step-2"


def test_damaged_checkpoint_load_is_a_person_facing_error(tmp_path):
    root = tmp_path / "ck"
    folder = _save(root, _state(1), {})
    (folder / "training_state.pt").write_bytes(b"x")
    with pytest.raises(DifftuneError, match="damaged checkpoint .training_state.pt does not match"):
        ckpt.load_checkpoint(folder)


def test_atomic_folder_replaces_only_on_success(tmp_path):
    target = tmp_path / "pipeline"
    with atomic_folder(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("one")
    assert (target / "sub" / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("half")
        raise RuntimeError("export failed")
    assert (target / "sub" / "a.txt").read_text() == "one"
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
    assert [p.name for p in target.iterdir()] == ["b.txt"]
