"""NaN/inf losses are skipped and bounded; out-of-memory and full disks stop with a useful message."""

from __future__ import annotations

import errno
import json

import pytest
import torch

import difftune.training.step as training_step
from difftune import load_config
from difftune.errors import DifftuneError
from difftune.models.sd import StableDiffusion
from difftune.training import checkpoint as ckpt
from difftune.training import faults
from difftune.training.loop import train


class _Scheduler:
    def __init__(self):
        self.last_epoch = 0

    def state_dict(self):
        return {"last_epoch": self.last_epoch}


class _ScaledOptimizer:
    """Stands in for accelerate's optimizer under fp16 gradient scaling (CUDA only)."""

    def __init__(self, skips: bool):
        self.skips, self.steps, self.step_was_skipped = skips, 0, False

    def step(self):
        self.step_was_skipped = self.skips
        self.steps += 0 if self.skips else 1


def test_guard_counts_skips_and_stops_after_limit():
    guard, sched = faults.NonFiniteGuard(limit=3), _Scheduler()
    for step, bad in enumerate([False, True, False, True, True]):
        sched.last_epoch = step
        guard.record(step, stepped=not bad, bad=bad, scheduler=sched)
    assert guard.skipped == 3 and guard.in_row == 2 and not guard.should_stop
    assert guard.first_bad_step == 3 and guard.scheduler_before_streak == {"last_epoch": 3}
    assert guard.skipped_before_streak == 1
    guard.record(5, stepped=False, bad=True, scheduler=sched)
    assert guard.should_stop
    assert "3 steps in a row (train.max_nan_steps = 3), starting at step 4" in str(guard.error(None))


def test_nonfinite_check_without_and_with_gradient_scaler():
    finite, nan, inf = torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))
    assert not faults.nonfinite(finite, torch.tensor(2.0), None)
    assert faults.nonfinite(nan, None, None)
    assert faults.nonfinite(finite, inf, None)  # without a scaler an inf gradient norm is a bad step
    assert not faults.nonfinite(finite, inf, scaler=object())  # the scaler handles inf gradients itself
    assert faults.nonfinite(nan, inf, scaler=object())


def test_scaler_skipped_steps_are_counted_but_do_not_stop_the_run():
    guard, sched = faults.NonFiniteGuard(limit=2), _Scheduler()
    optimizer = _ScaledOptimizer(skips=True)
    for step in range(4):  # fp16 overflow while the scale settles: finite loss, inf gradients
        stepped = faults.optimizer_step(optimizer, bad=False, scaler=object())
        guard.record(step, stepped, bad=False, scheduler=sched)
    assert guard.skipped == 4 and not guard.should_stop and optimizer.steps == 0
    ok = _ScaledOptimizer(skips=False)
    assert faults.optimizer_step(ok, bad=False, scaler=object()) and ok.steps == 1
    plain = _ScaledOptimizer(skips=False)
    assert not faults.optimizer_step(plain, bad=True, scaler=None) and plain.steps == 0


def _cfg(run_config, tiny_sd, data, out, **train_kw):
    return load_config(data=run_config(tiny_sd, data, out, train={
        "max_steps": 8, "checkpoint_every": 1, "checkpoints_keep": 0, "max_nan_steps": 3, **train_kw}))


def test_nan_steps_are_skipped_then_the_run_stops_with_the_last_good_state(tmp_path, tiny_sd, shapes_data,
                                                                          run_config, monkeypatch):
    real, calls = training_step.micro_batch_loss, []

    def loss(*args, **kwargs):  # one micro-batch per step: call i is step i + 1
        value = real(*args, **kwargs)
        calls.append(1)
        return value * float("nan") if len(calls) in (2, 4, 5, 6) else value

    monkeypatch.setattr(training_step, "micro_batch_loss", loss)
    messages = []
    out = tmp_path / "out"
    with pytest.raises(DifftuneError) as caught:
        train(_cfg(run_config, tiny_sd, shapes_data, out), log=messages.append)
    assert len(calls) == 6
    assert "NaN or infinite for 3 steps in a row" in str(caught.value)
    assert f"saved in {out / 'checkpoints' / 'step-3'}" in str(caught.value)
    assert any("step 2: the loss is NaN or infinite; skipped it (1 in a row" in m for m in messages)

    # No checkpoint at the skipped step 2 nor during the streak; step-3 is the state before it.
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-1", "step-3"]
    state = ckpt.load_checkpoint(out / "checkpoints" / "step-3")
    adam_steps = {float(s["step"]) for s in state.optimizer["state"].values()}
    assert adam_steps == {2.0}  # steps 1 and 3 updated the weights; step 2 did not
    assert state.scheduler["last_epoch"] == 3
    info = json.loads((out / "checkpoints" / "step-3" / "info.json").read_text())
    assert info["skipped_steps"] == 1 and info["data"]["micro_batch"] == 3


def test_out_of_memory_says_what_to_change_and_keeps_checkpoints(tmp_path, tiny_sd, shapes_data, run_config,
                                                                 monkeypatch):
    real, calls = StableDiffusion.predict, []

    def predict(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion, "predict", predict)
    out = tmp_path / "out"
    with pytest.raises(DifftuneError) as caught:
        train(_cfg(run_config, tiny_sd, shapes_data, out, batch_size=2))
    message = str(caught.value)
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in message
    for tip in ("lower train.batch_size (now 2)", "train.gradient_checkpointing = true", "data.cache_latents = true",
                "data.cache_text = true", "train.mixed_precision = \"bf16\"", "lower data.resolution (now 32)"):
        assert tip in message
    assert f"previous checkpoint {out / 'checkpoints' / 'step-2'} is intact" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert ckpt.load_checkpoint(ckpt.find_resumable(out / "checkpoints")).step == 2


def test_full_disk_during_training_stops_with_previous_checkpoint_intact(tmp_path, tiny_sd, shapes_data,
                                                                         run_config, monkeypatch):
    real, calls = ckpt.save_safetensors, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_safetensors", save)
    out = tmp_path / "out"
    with pytest.raises(ckpt.DiskFullError, match="the disk is full: writing checkpoint step-2"):
        train(_cfg(run_config, tiny_sd, shapes_data, out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert ckpt.load_checkpoint(out / "checkpoints" / "step-1").step == 1
