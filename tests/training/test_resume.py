"""Stopping and resuming gives the same adapter as an uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftune import load_config
from difftune.training import checkpoint as ckpt
from difftune.training.loop import train

pytestmark = pytest.mark.slow


def _cfg(run_config, tiny_sd, data, out, **train_kw):
    return load_config(data=run_config(
        tiny_sd, data, out,
        method={"rank": 4, "dropout": 0.1},
        data={"random_flip": True, "center_crop": False},
        train={"max_steps": 6, "batch_size": 2, "gradient_accumulation": 2, "checkpoint_every": 2,
               "checkpoints_keep": 0, "lr_scheduler": "cosine", "warmup_steps": 2, "noise_offset": 0.05,
               **train_kw},
    ))


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "pytorch_lora_weights.safetensors")


def test_resume_matches_uninterrupted_run(tmp_path, tiny_sd, shapes_data, run_config):
    straight = train(_cfg(run_config, tiny_sd, shapes_data, tmp_path / "a"))

    # A run stopped right after step 2 leaves exactly what the straight run had at step 2.
    out = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-2", out / "checkpoints" / "step-2")
    resumed = train(_cfg(run_config, tiny_sd, shapes_data, out, resume="latest"))
    a, b = _adapter(tmp_path / "a"), _adapter(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    # Losses logged after the resume point equal those of the straight run, exactly.
    assert dict(straight.losses)[6] == dict(resumed.losses)[6]


def test_resume_from_own_checkpoint_mid_epoch(tmp_path, tiny_sd, shapes_data, run_config):
    """Checkpoints written by an interrupted run (step 3 with 4 images, batch 2: mid-epoch)."""
    straight = tmp_path / "a"
    train(_cfg(run_config, tiny_sd, shapes_data, straight, checkpoint_every=3))
    out = tmp_path / "b"
    shutil.copytree(straight / "checkpoints" / "step-3", out / "checkpoints" / "step-3")
    train(_cfg(run_config, tiny_sd, shapes_data, out, checkpoint_every=3, resume=str(out / "checkpoints" / "step-3")))
    a, b = _adapter(straight), _adapter(out)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical


def test_damaged_newest_checkpoint_falls_back(tmp_path, tiny_sd, shapes_data, run_config, capsys):
    out = tmp_path / "a"
    train(_cfg(run_config, tiny_sd, shapes_data, out))
    newest = out / "checkpoints" / "step-6"  # the last step has a checkpoint too
    (newest / "trainable.safetensors").write_bytes(b"garbage")
    messages = []
    found = ckpt.find_resumable(out / "checkpoints", log=messages.append)
    assert found == out / "checkpoints" / "step-4"
    assert "step-6 is damaged (trainable.safetensors does not match its checksum)" in messages[0]


def test_retention_keeps_newest(tmp_path):
    root = tmp_path / "ckpts"
    for step in range(1, 6):
        state = ckpt.TrainingState(step, {"w": torch.ones(2) * step}, {}, {})
        ckpt.save_checkpoint(root, step, state, {})
        ckpt.prune(root, keep=3)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-3", "step-4", "step-5"]
    assert ckpt.verify(root / "step-5") is None
    state = ckpt.load_checkpoint(root / "step-5")
    assert state.step == 5 and torch.equal(state.trainable["w"], torch.full((2,), 5.0))
