"""Failures a user can cause around a run's checkpoints are one line naming what to do, never a traceback."""

from __future__ import annotations

import hashlib
import json

import pytest

from difftune.cli import main
from difftune.errors import DifftuneError
from difftune.training import checkpoint as ckpt


def forge(folder, name, data: bytes):
    """Damage a checkpoint file and rewrite the manifest to match, as a careless tool might."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    entry = manifest["files"][name]
    digest = hashlib.sha256(data).hexdigest()
    if isinstance(entry, dict):
        entry.update({k: v for k, v in (("sha256", digest), ("size", len(data)), ("bytes", len(data))) if k in entry})
    else:
        manifest["files"][name] = digest
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_forced_resume_after_a_rank_change_is_one_line(train_run):
    train_run(train={"max_steps": 2, "checkpoint_every": 2})
    with pytest.raises(DifftuneError, match=r"the checkpoint's tensors do not fit this run .*was method.rank changed"):
        train_run(train={"max_steps": 3, "resume": "latest", "resume_force": True}, method={"rank": 8})


def test_a_damaged_checkpoint_with_a_forged_manifest_is_one_line(train_run, tmp_path):
    train_run(train={"max_steps": 2, "checkpoint_every": 2})
    folder = tmp_path / "out" / "checkpoints" / "step-2"
    forge(folder, "trainable.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    assert ckpt.verify(folder) is None  # the manifest was forged to match
    with pytest.raises(DifftuneError, match=f"{folder}: damaged checkpoint .*resume from an earlier one"):
        train_run(train={"max_steps": 3, "resume": str(folder)})


def test_a_checkpoint_that_cannot_be_written_names_the_last_good_one(train_run, tmp_path, monkeypatch):
    save = ckpt.save_checkpoint

    def failing(root, step, *args, **kwargs):
        if step == 4:
            raise PermissionError(13, "Permission denied", str(root))
        return save(root, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", failing)
    with pytest.raises(DifftuneError) as err:
        train_run(train={"max_steps": 5, "checkpoint_every": 2})
    root = tmp_path / "out" / "checkpoints"
    assert str(err.value) == (f"the checkpoint of step 4 could not be written in {root} (Permission denied); "
                              f"the last good checkpoint is {root / 'step-2'}")


def test_an_os_error_is_one_line_in_the_cli(tmp_path, capsys, monkeypatch):
    import difftune.cli as cli

    def unreadable(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(cli, "cmd_env", unreadable)
    monkeypatch.setitem(cli.COMMANDS, "env", (unreadable, "", None))
    assert main(["env"]) == 1
    assert capsys.readouterr().err.strip() == f"difftune: error: {tmp_path / 'x'}: Permission denied"
