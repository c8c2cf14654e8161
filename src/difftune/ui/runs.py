"""Read run folders as ``difftune train`` writes them, wherever the run was started from.

A run folder holds ``config.toml`` and at least one of ``logs/``, ``checkpoints/`` or ``samples/``.
Progress and curves come from ``logs/progress.json`` and ``logs/metrics.jsonl``; folders from
before those files existed fall back to their TensorBoard event files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tomllib
from pathlib import Path

from difftune.training.holdout import read_mark
from difftune.training.progress import METRICS_FILE, read_metrics, read_progress
from difftune.ui.paths import Root

ADAPTER_FILES = ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "model.safetensors")
_STEP_DIR = re.compile(r"^step-(\d+)$")
SKIP_DIRS = {"node_modules", "__pycache__", "checkpoints", "samples", "logs", ".git"}


def is_run_folder(path: Path) -> bool:
    return (path / "config.toml").is_file() and any((path / d).is_dir() for d in ("logs", "checkpoints", "samples"))


def discover(root: Root, max_depth: int = 4) -> list[Path]:
    """Run folders under the root (not descending into hidden folders or into a run's own folders)."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        names = {e.name for e in entries}
        if "config.toml" in names and names & {"logs", "checkpoints", "samples"} and is_run_folder(folder):
            found.append(folder)
            return
        if depth >= max_depth:
            return
        for e in entries:
            if e.name.startswith(".") or e.name in SKIP_DIRS:
                continue
            if e.is_dir(follow_symlinks=False):
                walk(Path(e.path), depth + 1)

    walk(root.path, 0)
    return sorted(found)


def read_config(run: Path) -> dict:
    try:
        return tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def adapter_file(run: Path) -> Path | None:
    for name in ADAPTER_FILES:
        if (run / name).is_file():
            return run / name
    return None


def samples(run: Path) -> list[dict]:
    """``[{"step": N, "files": [names...]}]`` for every ``samples/step-N`` folder, oldest first."""
    out = []
    folder = run / "samples"
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for e in entries:
        m = _STEP_DIR.match(e.name)
        if m and e.is_dir():
            files = sorted(f.name for f in os.scandir(e.path) if f.name.endswith(".png"))
            out.append({"step": int(m.group(1)), "files": files})
    return sorted(out, key=lambda s: s["step"])


def checkpoints(run: Path) -> list[str]:
    folder = run / "checkpoints"
    try:
        names = [e.name for e in os.scandir(folder) if e.is_dir() and _STEP_DIR.match(e.name)]
    except OSError:
        return []
    return sorted(names, key=lambda n: int(n.split("-")[1]))


def metrics(run: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Metric rows from ``offset`` (bytes into ``metrics.jsonl``); TensorBoard events when that file is absent."""
    logs = run / "logs"
    if (logs / METRICS_FILE).exists() or not logs.is_dir():
        return read_metrics(logs, offset)
    if offset:
        return [], offset
    return tensorboard_metrics(logs), 0


def tensorboard_metrics(logs: Path) -> list[dict]:
    """``train/loss``, ``train/lr``, ``val/loss`` and ``val/word_gain`` from TensorBoard event files, as metric rows."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return []
    names = {"train/loss": "loss", "train/lr": "lr", "val/loss": "val_loss", "val/word_gain": "val_word_gain"}
    rows: dict[int, dict] = {}
    for folder in sorted({p.parent for p in logs.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag in names:
                for ev in acc.Scalars(tag):
                    rows.setdefault(ev.step, {"step": ev.step})[names[tag]] = ev.value
    return [rows[s] for s in sorted(rows)]


def summary(root: Root, run: Path, job: dict | None = None) -> dict:
    """What the run list shows: name, status, step of total, latest loss, adapter."""
    progress = read_progress(run / "logs") or {}
    status = progress.get("status") or ("done" if adapter_file(run) else "unknown")
    if job is not None:  # the queue knows best about its own runs
        status = job["status"]
    config = read_config(run)
    return {
        "run": root.rel(run), "status": status, "step": progress.get("step"),
        "total_steps": progress.get("total_steps"), "updated": progress.get("updated"),
        "eta_seconds": progress.get("eta_seconds"), "steps_per_second": progress.get("steps_per_second"),
        "adapter": root.rel(adapter_file(run)) if adapter_file(run) else None,
        "model": (config.get("model") or {}).get("path"), "method": (config.get("method") or {}).get("type"),
        "job": job["id"] if job else None, "source": "queue" if job else "cli",
    }


def detail(root: Root, run: Path, offset: int = 0) -> dict:
    """Everything the Watch page polls: progress, new metric rows, samples, checkpoints, files."""
    rows, next_offset = metrics(run, offset)
    config_text = ""
    with contextlib.suppress(OSError):
        config_text = (run / "config.toml").read_text(encoding="utf-8")
    performance = None
    with contextlib.suppress(OSError, ValueError):
        performance = json.loads((run / "logs" / "performance.json").read_text())
    mark = read_mark(run / "checkpoints")  # the checkpoint the run marked best (held-out loss or word gain)
    adapter = adapter_file(run)
    config = read_config(run)
    return {
        "run": root.rel(run), "progress": read_progress(run / "logs"), "metrics": rows, "offset": next_offset,
        "best": mark[0] if mark else None,
        "samples": samples(run), "checkpoints": checkpoints(run), "config": config_text,
        "prompts": (config.get("validation") or {}).get("prompts", []),
        "performance": performance, "adapter": root.rel(adapter) if adapter else None,
        "card": root.rel(run / "README.md") if (run / "README.md").is_file() else None,
        "exists": run.is_dir(),
    }


def flat_config(config: dict) -> dict[str, object]:
    flat: dict[str, object] = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v
        else:
            flat[section] = values
    return flat


def config_differences(configs: list[dict]) -> list[dict]:
    """Keys whose values differ between runs: ``[{"key": ..., "values": [...]}]`` (``None`` = not set)."""
    flats = [flat_config(c) for c in configs]
    keys = sorted({k for f in flats for k in f})
    return [{"key": k, "values": [f.get(k) for f in flats]} for k in keys
            if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
