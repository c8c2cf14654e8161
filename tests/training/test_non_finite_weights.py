"""No run ends "done" (or checkpoints) with NaN/inf weights: it stops naming the last good checkpoint."""

from __future__ import annotations

import pytest
import torch

from difftune.errors import DifftuneError
from difftune.training import loop


def test_non_finite_weights_stop_the_run_and_keep_the_last_good_checkpoint(train_run, tmp_path, monkeypatch):
    step = loop.train_step

    def poisoned(run, stop):
        outcome = step(run, stop)
        if run.step == 3:  # weights go bad without a non-finite loss (which the guard would catch)
            with torch.no_grad():
                run.model.params[0].view(-1)[0] = float("nan")
        return outcome

    monkeypatch.setattr(loop, "train_step", poisoned)
    with pytest.raises(DifftuneError) as err:
        train_run(train={"max_steps": 5, "checkpoint_every": 2})
    out = tmp_path / "out"
    assert "hold NaN or infinity after step 5" in str(err.value) and "nothing was exported" in str(err.value)
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-2'}" in str(err.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert not list(out.glob("*.safetensors")) and not (out / "README.md").exists()
