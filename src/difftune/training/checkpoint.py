"""Training-state checkpoints that survive being killed at any moment.

A checkpoint is written into a staging folder ``.tmp-step-N`` (:func:`save_checkpoint`): every process
writes its own random state (``rng-<rank>.pt``), then the main process writes the weights, the training state
and ``info.json``, flushes them, writes ``manifest.json`` (each file's checksum) last and renames
the folder into place in one step. A folder without an intact manifest is never used. Re-saving
an existing step moves the old folder aside first (``.old-step-N``), so a complete copy of that
step exists at every moment; :func:`repair` puts it back if a kill came between the two renames.
Older checkpoints are pruned only after the new one is complete.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from difftune.errors import DifftuneError
from difftune.fileio import file_sha256, fsync_dir, replace_folder, save_safetensors

MANIFEST = "manifest.json"
#: The subfolder of a sharded checkpoint's ``torch.distributed.checkpoint`` files.
SHARDED = "sharded"
PREFIX = "step-"
STAGING = ".tmp-"
OLD = ".old-"
DELETING = ".del-"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@dataclass
class TrainingState:
    """What a checkpoint restores. ``info`` and ``rng`` are filled when a checkpoint is loaded."""

    step: int
    #: Every trainable tensor, ``role.parameter_name`` (``Method.trainable_state_dict``); ``None`` when the
    #: weights and optimizer state are in the sharded part (``sharded``).
    trainable: dict[str, torch.Tensor] | None
    optimizer: dict | None
    scheduler: dict
    #: The fp16 gradient scaler's state, if the run has one.
    scaler: dict | None = None
    #: ``info.json``: what the run recorded about itself (read through ``resume.CheckpointInfo``).
    info: dict = field(default_factory=dict)
    #: This process's random state (``rng-<rank>.pt``), if it was saved.
    rng: dict | None = None
    #: The ``torch.distributed.checkpoint`` folder of a sharded (FSDP) run: weights and optimizer state.
    sharded: Path | None = None


class DiskFullError(DifftuneError):
    """The disk filled up while a checkpoint was written; the previous checkpoints are intact."""


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


def staging_folder(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is assembled; every process can name it without talking."""
    return root / f"{STAGING}{PREFIX}{step}"


def begin(root: Path, step: int) -> Path:
    """Create an empty staging folder for ``step`` (main process only) and return it."""
    root.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(root, step)
    if staging.exists():  # left by a killed run
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def save_process_state(staging: Path, rank: int) -> None:
    """What each process writes itself into the staging folder before :func:`finish`: its random state."""
    with _disk_full_is_reported(staging.parent, staging, 1 << 20):
        target = staging / f"rng-{rank}.pt"
        torch.save(rng_state(), target)
        _fsync_file(target)


def finish(root: Path, staging: Path, state: TrainingState, info: dict) -> Path:
    """Write the rest of the checkpoint into ``staging``, then rename it to ``root/step-N``; return that."""
    final = root / f"{PREFIX}{state.step}"
    with _disk_full_is_reported(root, staging, _estimated_bytes(state)):
        try:
            if state.trainable is not None:
                save_safetensors(state.trainable, staging / "trainable.safetensors")
            blob = {"optimizer": state.optimizer, "scheduler": state.scheduler}
            if state.scaler is not None:
                blob["scaler"] = state.scaler
            torch.save(blob, staging / "training_state.pt")
            (staging / "info.json").write_text(json.dumps({"step": state.step, **info}, indent=2, sort_keys=True,
                                                          default=str))
            files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
            for p in files:
                _fsync_file(p)
            for sub in {p.parent for p in files} - {staging}:
                fsync_dir(sub)
            manifest = {"step": state.step,
                        "files": {p.relative_to(staging).as_posix(): file_sha256(p) for p in files}}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            _fsync_file(staging / MANIFEST)
            fsync_dir(staging)
            _move_into_place(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def _alone() -> None:
    """The barrier of a single process."""


def save_checkpoint(root: Path, step: int, state: TrainingState | None, info: dict, *, rank: int = 0,
                    barrier: Callable[[], None] = _alone,
                    sharded: Callable[[Path], None] | None = None) -> Path | None:
    """Write ``root/step-N`` atomically and return it; every process of a run calls this.

    The main process passes the ``state`` (the others ``None``): it opens the staging folder, each
    process writes its own part (its random state, and with ``sharded`` its shard of the weights and
    optimizer state into ``sharded/``, a collective), then it writes the rest. Returns ``None`` on the
    other processes.
    """
    barrier()
    if state is not None:
        begin(root, step)
    barrier()
    staging = staging_folder(root, step)
    try:
        save_process_state(staging, rank)
        if sharded is not None:
            sharded(staging / SHARDED)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()
    return finish(root, staging, state, info) if state is not None else None


def _move_into_place(staging: Path, final: Path) -> None:
    # Never delete a complete checkpoint before its replacement is in place (see :func:`repair`).
    replace_folder(staging, final, final.with_name(f"{OLD}{final.name}"))


def _estimated_bytes(state: TrainingState) -> int:
    def size(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(size(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(size(v) for v in obj)
        return 0

    return size(state.trainable or {}) + size(state.optimizer or {}) + size(state.scaler or {}) + (1 << 20)


class _disk_full_is_reported:
    """Turn "no space left" into a :class:`DiskFullError` naming the folder and the space involved."""

    def __init__(self, root: Path, staging: Path, needed: int) -> None:
        self.root, self.staging, self.needed = root, staging, needed

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if not isinstance(exc, OSError) or exc.errno not in _DISK_FULL:
            return False
        shutil.rmtree(self.staging, ignore_errors=True)
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = 0
        previous = newest_complete(self.root)
        raise DiskFullError(
            f"the disk is full: writing checkpoint {self.staging.name.removeprefix(STAGING)} in {self.root} needs "
            f"about {_mb(self.needed)}, {_mb(free)} free. "
            + (f"The previous checkpoint {previous} is intact. " if previous else "No earlier checkpoint exists. ")
            + "Free some space (or lower train.checkpoints_keep) and resume with --set train.resume=latest"
        ) from exc


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def verify(folder: Path) -> str | None:
    """``None`` if the checkpoint is complete and intact, else the reason it is not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, OSError):
        return "manifest is unreadable"
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if file_sha256(p) != digest:
            return f"{name} does not match its checksum"
    return None


def _step_of(name: str, prefix: str) -> int | None:
    rest = name[len(prefix):] if name.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first (staging and moved-aside folders are not checkpoints)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p.name, PREFIX) is not None]
    return sorted(found, key=lambda p: _step_of(p.name, PREFIX))


def newest_complete(root: Path) -> Path | None:
    """The newest checkpoint with a manifest (not checksummed: for messages)."""
    for folder in reversed(list_checkpoints(root)):
        if (folder / MANIFEST).is_file():
            return folder
    return None


def repair(root: Path, log=print) -> None:
    """Undo what a kill during a save can leave: put a moved-aside complete checkpoint back, drop staging folders.

    Call it from one process only.
    """
    if not root.is_dir():
        return
    for old in root.glob(f"{OLD}{PREFIX}*"):
        final = root / old.name[len(OLD):]
        try:
            if not final.exists() and verify(old) is None:
                os.replace(old, final)
                log(f"note: restored checkpoint {final} (a save of the same step was interrupted)")
            else:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    _remove_leftovers(root)


def _remove_leftovers(root: Path) -> None:
    for pattern in (f"{STAGING}{PREFIX}*", f"{DELETING}{PREFIX}*"):
        for stale in root.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def find_resumable(root: Path, log=print, repair_first: bool = True) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are reported and skipped."""
    if repair_first:
        repair(root, log)
    for folder in reversed(list_checkpoints(root)):
        problem = verify(folder)
        if problem is None:
            return folder
        log(f"warning: checkpoint {folder} is damaged ({problem}); trying the previous one")
    return None


def load_checkpoint(folder: Path, rank: int = 0) -> TrainingState:
    """Load a verified checkpoint; ``rng`` is process ``rank``'s random state (if saved)."""
    from safetensors.torch import load_file

    problem = verify(folder)
    if problem:
        raise DifftuneError(f"{folder}: damaged checkpoint ({problem}); resume from an earlier one")
    sharded = folder / SHARDED if (folder / SHARDED).is_dir() else None
    try:
        trainable = None if sharded else load_file(folder / "trainable.safetensors")
        # Our own file, verified by checksum above; it holds optimizer state and Python RNG tuples.
        blob = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False)
        info = json.loads((folder / "info.json").read_text())
        rng_file = folder / f"rng-{rank}.pt"
        rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.is_file() else None
        step, optimizer, scheduler = info["step"], blob["optimizer"], blob["scheduler"]
    except Exception as exc:  # noqa: BLE001 - files that pass the checksum but do not load (a forged manifest)
        raise DifftuneError(f"{folder}: damaged checkpoint (its files do not load although the manifest matches: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); resume from an "
                            "earlier one") from None
    return TrainingState(step, trainable, optimizer, scheduler, blob.get("scaler"), info, rng, sharded)


def prune(root: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all) and ``protect``; also stale temporary folders.

    Only complete checkpoints count towards ``keep``, so a damaged newer folder never causes the
    last good one to be removed.
    """
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    _remove_leftovers(root)
    if keep <= 0:
        return removed
    complete = [f for f in list_checkpoints(root) if (f / MANIFEST).is_file()]
    for folder in complete[:-keep]:
        if protect is not None and folder.name == protect.name:
            continue
        # Renamed first, so a kill during the deletion never leaves a half-deleted step-N behind.
        doomed = root / f"{DELETING}{folder.name}"
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(folder)
    return removed
