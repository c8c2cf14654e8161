"""The optional wandb tracker works without a network (WANDB_MODE=offline)."""

from __future__ import annotations

import pytest

from difftune import load_config
from difftune.training.loop import train

pytestmark = pytest.mark.slow


def test_wandb_offline_run_logs_locally(tmp_path, tiny_sd, shapes_data, run_config, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "out", train={"max_steps": 2},
                                      validation={"prompts": ["a red circle"], "steps": 2},
                                      logging={"report_to": "wandb", "project": "difftune-test"}))
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no offline wandb log written"
