"""logs/progress.json and logs/metrics.jsonl: live progress any reader can poll."""

from __future__ import annotations

import json
import subprocess
import sys

from difftune import load_config
from difftune.training.loop import train
from difftune.training.progress import RunProgress, read_metrics, read_progress


def test_a_run_writes_progress_and_metrics(tmp_path, tiny_sd, shapes_data, run_config):
    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "out", train={"max_steps": 4, "log_every": 2}))
    train(cfg)
    logs = tmp_path / "out" / "logs"
    state = read_progress(logs)
    assert state["status"] == "done" and state["step"] == 4 and state["total_steps"] == 4
    rows, _ = read_metrics(logs)
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["loss"] > 0 and r["lr"] == 1e-3 for r in rows)


def test_resume_drops_lines_after_the_checkpoint_and_fresh_runs_start_empty(tmp_path):
    logs = tmp_path / "logs"
    first = RunProgress(logs, 10)
    for step in (2, 4, 6, 8):
        first.metrics(step, loss=1.0 / step)
    RunProgress(logs, 10, step=4)  # resumed from the checkpoint at step 4
    assert [r["step"] for r in read_metrics(logs)[0]] == [2, 4]
    RunProgress(logs, 10)  # a new run from step 0
    assert read_metrics(logs)[0] == []


def test_partial_last_line_and_nan_values(tmp_path):
    progress = RunProgress(tmp_path, 5)
    progress.metrics(1, loss=float("nan"), lr=0.5)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "lo')  # a writer in the middle of a line
    rows, offset = read_metrics(tmp_path)
    assert rows == [{"step": 1, "loss": None, "lr": 0.5}]
    assert read_metrics(tmp_path, offset) == ([], offset)


def test_status_of_a_process_that_died_is_killed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "progress.json").write_text(json.dumps({"status": "running", "pid": int(dead.stdout), "step": 3}))
    assert read_progress(tmp_path)["status"] == "killed"
    progress = RunProgress(tmp_path, 5)
    progress.step_done(1)
    progress.finish("stopped")
    assert read_progress(tmp_path)["status"] == "stopped"
    assert read_progress(tmp_path / "nowhere") is None
