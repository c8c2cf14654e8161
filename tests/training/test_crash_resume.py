"""Interrupted runs resume exactly, and resuming a different run is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import difftune.training.step as training_step
from difftune import load_config
from difftune.errors import DifftuneError
from difftune.training import checkpoint as ckpt
from difftune.training.loop import train

pytestmark = pytest.mark.slow

ADAPTER = "pytorch_lora_weights.safetensors"


def _cfg(run_config, tiny_sd, data, out, method=None, **train_kw):
    # 4 images, batch 1 × 2 accumulation: 2 steps per epoch, so step 1 ends mid-epoch and step 2 on a boundary.
    return load_config(data=run_config(
        tiny_sd, data, out,
        method={"rank": 4, "dropout": 0.1, **(method or {})},
        data={"random_flip": True, "center_crop": False},
        train={"max_steps": 5, "batch_size": 1, "gradient_accumulation": 2, "checkpoint_every": 0,
               "checkpoints_keep": 0, "lr_scheduler": "cosine", "warmup_steps": 1, "noise_offset": 0.05,
               "log_every": 1, **train_kw},
    ))


def _interrupt_at_micro_batch(monkeypatch, k: int, signum=signal.SIGINT):
    """Send ``signum`` to this process while micro-batch ``k`` of the next run is computed."""
    real, calls = training_step.micro_batch_loss, []

    def loss(*args, **kwargs):
        if len(calls) == k:
            os.kill(os.getpid(), signum)
        calls.append(k)
        return real(*args, **kwargs)

    monkeypatch.setattr(training_step, "micro_batch_loss", loss)


def test_chained_interruptions_give_bit_identical_adapter_and_losses(tmp_path, tiny_sd, shapes_data, run_config,
                                                                    monkeypatch):
    # Whatever the test process started with (a shell running it in the background ignores SIGINT).
    sigint_before, sigterm_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    straight = train(_cfg(run_config, tiny_sd, shapes_data, tmp_path / "a"))
    out = tmp_path / "b"
    losses, messages = [], []

    # 1st segment: SIGINT during step 1; the step finishes, a checkpoint is written, nothing is exported.
    _interrupt_at_micro_batch(monkeypatch, 1)
    first = train(_cfg(run_config, tiny_sd, shapes_data, out), log=messages.append)
    assert first.interrupted == signal.SIGINT and first.files == [] and first.steps == 1  # where it stopped
    assert not (out / ADAPTER).exists()
    assert any("stopped by SIGINT after step 1" in m and "--set train.resume=latest" in m for m in messages)
    info = json.loads((out / "checkpoints" / "step-1" / "info.json").read_text())
    assert info["data"] | {"fingerprint": None} == {"epoch": 0, "batch": 2, "micro_batch": 2, "fingerprint": None,
                                                    "examples": 4}
    losses += first.losses

    # 2nd segment: resumed, stopped by SIGTERM at the epoch boundary (after step 2).
    _interrupt_at_micro_batch(monkeypatch, 0, signal.SIGTERM)
    second = train(_cfg(run_config, tiny_sd, shapes_data, out, resume="latest"))
    assert second.interrupted == signal.SIGTERM and second.steps == 2
    info = json.loads((out / "checkpoints" / "step-2" / "info.json").read_text())
    assert (info["data"]["epoch"], info["data"]["batch"]) == (1, 0)
    losses += second.losses

    # 3rd segment: runs to the end.
    monkeypatch.undo()
    third = train(_cfg(run_config, tiny_sd, shapes_data, out, resume="latest"))
    assert third.interrupted is None and third.steps == 5
    losses += third.losses

    assert [s for s, _ in losses] == [1, 2, 3, 4, 5]
    assert losses == straight.losses  # exactly equal floats
    a, b = load_file(tmp_path / "a" / ADAPTER), load_file(out / ADAPTER)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGINT) is sigint_before  # handlers restored
    assert signal.getsignal(signal.SIGTERM) is sigterm_before


@pytest.fixture
def stopped_run(tmp_path, tiny_sd, shapes_data, run_config, monkeypatch):
    """A run stopped after step 1 with a checkpoint; returns its output folder."""
    out = tmp_path / "run"
    _interrupt_at_micro_batch(monkeypatch, 0)
    assert train(_cfg(run_config, tiny_sd, shapes_data, out, max_steps=3)).interrupted
    monkeypatch.undo()
    return out


def test_changed_method_or_data_is_refused_unless_forced(stopped_run, tiny_sd, shapes_data, run_config):
    def resume(data=shapes_data, force=False, **method):
        return train(_cfg(run_config, tiny_sd, data, stopped_run, method=method, max_steps=3, resume="latest",
                          resume_force=force), log=messages.append)

    messages = []
    with pytest.raises(DifftuneError) as caught:
        resume(dropout=0.2)
    assert "method.dropout (0.1 → 0.2)" in str(caught.value) and "--force-resume" in str(caught.value)

    changed = shapes_data.parent / "changed"
    shutil.copytree(shapes_data, changed)
    meta = changed / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("circle", "disc", 1))
    with pytest.raises(DifftuneError, match="the training images or captions changed"):
        resume(data=changed)
    assert ckpt.list_checkpoints(stopped_run / "checkpoints")[-1].name == "step-1"  # nothing was touched

    result = resume(dropout=0.2, force=True)
    assert result.steps == 3 and (stopped_run / ADAPTER).is_file()
    assert any("resuming anyway (train.resume_force): changed settings: method.dropout" in m for m in messages)


def test_benign_changes_are_noted(stopped_run, tiny_sd, shapes_data, run_config):
    messages = []
    cfg = _cfg(run_config, tiny_sd, shapes_data, stopped_run, max_steps=4, log_every=2, resume="latest",
               learning_rate=5e-4)
    result = train(cfg, log=messages.append)
    assert [s for s, _ in result.losses] == [2, 4]
    note = next(m for m in messages if m.startswith("note: changed since the checkpoint"))
    assert "train.max_steps (3 → 4)" in note and "train.log_every (1 → 2)" in note
    assert "cosine schedule now spans the new length" in note
    warning = next(m for m in messages if m.startswith("warning: these settings changed"))
    assert "train.learning_rate (0.001 → 0.0005)" in warning and "max_steps" not in warning


def _as_if_written_before(folder, missing):
    """Rewrite a checkpoint as an older difftune wrote it: without the settings in ``missing``."""
    from difftune.fileio import file_sha256

    info_file = folder / "info.json"
    info = json.loads(info_file.read_text())
    for key in missing:
        del info["config"][key]
    info_file.write_text(json.dumps(info))
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"]["info.json"] = file_sha256(info_file)
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_settings_added_since_the_checkpoint_are_no_change_at_their_defaults(stopped_run, tiny_sd, shapes_data,
                                                                            run_config):
    folder = ckpt.list_checkpoints(stopped_run / "checkpoints")[-1]
    _as_if_written_before(folder, ["model.offload", "method.ema_export", "method.dropout"])
    messages = []
    # method.dropout is 0.1 in this run, not its default: a setting the old run did not record, now set.
    with pytest.raises(DifftuneError) as caught:
        train(_cfg(run_config, tiny_sd, shapes_data, stopped_run, max_steps=3, resume="latest"),
              log=messages.append)
    assert "method.dropout (None → 0.1)" in str(caught.value)
    assert "model.offload" not in str(caught.value) and "method.ema_export" not in str(caught.value)

    result = train(_cfg(run_config, tiny_sd, shapes_data, stopped_run, method={"dropout": 0.0}, max_steps=3,
                        resume="latest"), log=messages.append)
    assert result.steps == 3
    note = [m for m in messages if m.startswith("note: settings added to difftune since")][-1]
    assert "method.dropout" in note and "method.ema_export" in note and "model.offload" in note
