"""Live progress of a run, as small files any reader can poll (``difftune ui``, scripts, ``watch cat``).

Two files under the run's ``logs/`` folder, written only by the main process:

- ``progress.json``: the latest state, replaced atomically (write beside, then rename), so a reader
  never sees half a file::

      {"status": "running", "step": 120, "total_steps": 300, "pid": 4242,
       "started": 1730000000.0, "updated": 1730000042.5, "steps_per_second": 2.9, "eta_seconds": 62.1}

  ``status`` is ``running``, then ``done``, ``stopped`` (SIGINT/SIGTERM, with a checkpoint),
  ``early_stopped`` or ``failed``. A ``running`` file whose ``pid`` no longer exists belongs to a
  run that was killed.
- ``metrics.jsonl``: one JSON object per line, appended as values are logged, e.g.
  ``{"step": 10, "loss": 0.12, "lr": 0.0001}`` and ``{"step": 50, "val_loss": 0.09}``. A reader
  ignores a last line without its newline (still being written).

TensorBoard's files hold the same numbers but are flushed only every couple of minutes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from pathlib import Path

PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"
#: Rewrite ``progress.json`` at most this often during steps (status changes are written at once).
MIN_INTERVAL = 0.5


class RunProgress:
    """Writes ``progress.json`` and ``metrics.jsonl``; a no-op when ``enabled`` is false (other processes)."""

    def __init__(self, folder: Path, total_steps: int, step: int = 0, enabled: bool = True) -> None:
        self.folder = Path(folder)
        self.enabled = enabled
        self.total = total_steps
        self.step = step
        self.started = time.time()
        self._times: deque[tuple[float, int]] = deque(maxlen=50)  # (time, step) for the speed
        self._written = 0.0
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._keep_metrics_up_to(step)
            self._times.append((time.monotonic(), step))
            self._write("running")

    def step_done(self, step: int) -> None:
        self.step = step
        if not self.enabled:
            return
        self._times.append((time.monotonic(), step))
        if time.monotonic() - self._written >= MIN_INTERVAL:
            self._write("running")

    def metrics(self, step: int, **values: float) -> None:
        """Append one line, e.g. ``metrics(10, loss=0.1, lr=1e-4)``; NaN/inf are written as null."""
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(v) else None) for k, v in values.items()}
        with open(self.folder / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **clean}) + "\n")

    def _keep_metrics_up_to(self, step: int) -> None:
        """A fresh run starts an empty file; a resumed one drops lines logged after its checkpoint."""
        path = self.folder / METRICS_FILE
        if not path.exists():
            return
        rows, _ = read_metrics(self.folder) if step else ([], 0)
        kept = "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step)
        tmp = path.with_name(f".{METRICS_FILE}.{os.getpid()}.tmp")
        tmp.write_text(kept, encoding="utf-8")
        os.replace(tmp, path)

    def finish(self, status: str) -> None:
        if self.enabled:
            self._write(status)

    def speed(self) -> float | None:
        if len(self._times) < 2:
            return None
        (t0, s0), (t1, s1) = self._times[0], self._times[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def _write(self, status: str) -> None:
        speed = self.speed()
        state = {
            "status": status, "step": self.step, "total_steps": self.total, "pid": os.getpid(),
            "started": self.started, "updated": time.time(), "steps_per_second": speed,
            "eta_seconds": (self.total - self.step) / speed if speed and status == "running" else None,
        }
        target = self.folder / PROGRESS_FILE
        tmp = target.with_name(f".{PROGRESS_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, target)  # atomic; no fsync: a progress display does not need to survive a power cut
        self._written = time.monotonic()


def read_progress(folder: Path) -> dict | None:
    """``progress.json`` of a run's ``logs/`` folder, or ``None``; ``status`` becomes ``killed`` if its process is gone."""
    try:
        state = json.loads((Path(folder) / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    if state.get("status") == "running" and not _alive(state.get("pid")):
        state["status"] = "killed"
    return state


def read_metrics(folder: Path, start: int = 0) -> tuple[list[dict], int]:
    """Complete lines of ``metrics.jsonl`` from byte offset ``start``; returns (rows, next offset)."""
    path = Path(folder) / METRICS_FILE
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
    except OSError:
        return [], start
    end = data.rfind(b"\n") + 1  # a last line without its newline is still being written
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows, start + end


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
