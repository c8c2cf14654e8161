"""Training-state checkpoints: written to a temporary folder, flushed, verified by a manifest,
then renamed into place in one step. Older checkpoints are pruned only after that.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difftune.fileio import fsync_dir, save_safetensors

MANIFEST = "manifest.json"
PREFIX = "step-"


@dataclass
class TrainingState:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    extra: dict


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, state: TrainingState, info: dict) -> Path:
    """Write ``root/step-N`` atomically and return it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.step}"
    tmp = root / f".tmp-{PREFIX}{state.step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_safetensors(state.trainable, tmp / "trainable.safetensors")
        torch.save(
            {"optimizer": state.optimizer, "scheduler": state.scheduler, "rng": rng_state(), **state.extra},
            tmp / "training_state.pt",
        )
        (tmp / "info.json").write_text(json.dumps({"step": state.step, **info}, indent=2, sort_keys=True))
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for p in files:
            _fsync_file(p)
        manifest = {"step": state.step, "files": {p.name: _sha256(p) for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync_file(tmp / MANIFEST)
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify(folder: Path) -> str | None:
    """``None`` if the checkpoint is complete and intact, else the reason it is not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "manifest is unreadable"
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if _sha256(p) != digest:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_resumable(root: Path, log=print) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are reported and skipped."""
    for folder in reversed(list_checkpoints(root)):
        problem = verify(folder)
        if problem is None:
            return folder
        log(f"warning: checkpoint {folder} is damaged ({problem}); trying the previous one")
    return None


def load_checkpoint(folder: Path) -> TrainingState:
    from safetensors.torch import load_file

    problem = verify(folder)
    if problem:
        raise ValueError(f"{folder}: damaged checkpoint ({problem})")
    trainable = load_file(folder / "trainable.safetensors")
    # Our own file, verified by checksum above; it holds optimizer state and Python RNG tuples.
    blob = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False)
    info = json.loads((folder / "info.json").read_text())
    extra = {k: v for k, v in blob.items() if k not in ("optimizer", "scheduler")}
    extra["info"] = info
    return TrainingState(info["step"], trainable, blob["optimizer"], blob["scheduler"], extra)


def prune(root: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all) and ``protect``; also stale temporary folders."""
    removed = []
    for stale in root.glob(f".tmp-{PREFIX}*") if root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return removed
    for folder in list_checkpoints(root)[:-keep]:
        if protect is not None and folder.name == protect.name:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
