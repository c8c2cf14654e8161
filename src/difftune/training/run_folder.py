"""A run folder belongs to one run: a lock while it runs, and no silent reuse of another run's results.

:class:`RunFolder` is made before anything else of a run: :meth:`RunFolder.check` (every process,
before the model loads, writing nothing) refuses a folder that is a file, one in use by a running
run, or one holding another run's results (unless ``output.existing`` says to overwrite it or to use
a new numbered folder, or ``train.resume`` continues that run). :meth:`RunFolder.claim` (the main
process, once the model is loaded and known good) creates the folder and takes its lock: an
exclusive ``fcntl`` lock on ``.difftune.lock``, held until the run ends and released by the system
if the process dies, so a crashed run never leaves a stale lock. In a multi-process run only the
main process (rank 0) claims, which is enough: a second run into the same folder, whatever its
number of processes, has a main process too, and its claim is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from difftune.config.schema import OutputConfig
from difftune.errors import DifftuneError

LOCK = ".difftune.lock"
#: Written when a run has exported its result: the files it wrote (what ``overwrite`` deletes).
FINISHED = ".difftune-finished.json"
#: What every run writes into its folder (besides its exported files).
RUN_FILES = ("config.toml", "README.md", "checkpoints", "samples", "logs", FINISHED)


def previous_run_files(root: Path) -> list[Path]:
    """The files and folders in ``root`` that a difftune run wrote, sorted (none for a new or foreign folder)."""
    if not root.is_dir():
        return []
    found = [root / name for name in RUN_FILES if (root / name).exists()]
    found += [p for p in root.glob("*.safetensors") if p not in found]
    marker = root / FINISHED
    if marker.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError):
            found += [root / name for name in json.loads(marker.read_text())["files"] if (root / name).exists()]
    return sorted(set(found))


def lock_holder(root: Path) -> str | None:
    """Who holds ``root``'s lock (``pid N on host H since T``), or ``None`` if no running run does."""
    import fcntl

    lock = root / LOCK
    if not lock.is_file():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe_holder(lock)
    finally:
        os.close(fd)  # closing drops the shared lock taken to test
    return None


def _describe_holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on host {info['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def next_free(root: Path) -> Path:
    """``root-2``, ``root-3``, ...: the first that holds no run and is not in use."""
    n = 2
    while (root.parent / f"{root.name}-{n}").exists():
        n += 1
    return root.parent / f"{root.name}-{n}"


class RunFolder:
    """The output folder of one run; a context manager that releases the lock when the run ends."""

    def __init__(self, output: OutputConfig, resume: str | None) -> None:
        self.requested = Path(output.dir).expanduser()
        self.root = self.requested
        self.existing = output.existing
        # ``resume = "latest"`` continues the run in this folder only if it left a checkpoint
        self.resuming = bool(resume) and (resume != "latest" or any((self.requested / "checkpoints").glob("step-*")))
        self._fd: int | None = None
        self._to_remove: list[Path] = []
        #: Names in the folder when this run claimed it (``None`` before the claim).
        self._found: set[str] | None = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def check(self) -> Path:
        """Refuse a folder this run may not use (nothing is written); return the folder it will use."""
        root = self.requested
        if root.exists() and not root.is_dir():
            raise DifftuneError(f"output.dir: {root} is a file, not a folder; choose a folder for the run's results")
        parent = next(p for p in (root, *root.absolute().parents) if p.exists())
        if not parent.is_dir():
            raise DifftuneError(f"output.dir: cannot create {root}: {parent} is a file, not a folder")
        holder = lock_holder(root)
        if holder:
            raise DifftuneError(f"output.dir: {root} is in use by a running difftune run ({holder}); wait for it "
                                "to end or choose another output.dir")
        previous = [] if self.resuming else previous_run_files(root)
        if previous and self.existing == "refuse":
            names = ", ".join(p.name for p in previous[:4])
            resumable = any((root / "checkpoints").glob("step-*"))
            raise DifftuneError(
                f"output.dir: {root} holds another run's results ({names}); nothing was written. "
                + ("Continue it with --set train.resume=latest, replace" if resumable else
                   "It left no checkpoint to continue from: replace")
                + " it with --overwrite, or use a new numbered folder with --new-folder (output.existing)")
        if previous and self.existing == "new":
            self.root = next_free(root)
        self._to_remove = previous if self.existing == "overwrite" else []
        return self.root

    def claim(self, log=print) -> None:
        """Create the folder and take its lock (the main process); with ``overwrite``, remove the old run's files."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DifftuneError(f"output.dir: cannot write in {self.root} ({exc.strerror})") from None
        self._lock(fd)
        self._found = {p.name for p in self.root.iterdir()} - {p.name for p in self._to_remove}
        _remove(self._to_remove)
        if self._to_remove:
            log(f"output.existing = \"overwrite\": removed the previous run's {len(self._to_remove)} file(s) and "
                f"folder(s) in {self.root}")
        if self.root != self.requested:
            log(f"output.dir: {self.requested} holds another run; this run writes to {self.root}")

    def _lock(self, fd: int) -> None:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DifftuneError(f"output.dir: {self.root} is in use by a running difftune run "
                                f"({_describe_holder(self.root / LOCK)}); wait for it or choose another "
                                "output.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        self._fd = fd

    def mark_finished(self, files: list[Path]) -> None:
        """Record that this folder holds a finished run and which files it exported."""
        names = sorted({str(Path(f).relative_to(self.root)).split(os.sep)[0] for f in files
                        if Path(f).is_relative_to(self.root)})
        (self.root / FINISHED).write_text(json.dumps({"files": names}, indent=2) + "\n", encoding="utf-8")

    def discard_new_files(self) -> list[Path]:
        """Remove what this run wrote into its folder (a run stopped before its first step, with nothing
        to keep), leaving the folder as the run found it; return what was removed."""
        if self._found is None or self.resuming:
            return []
        removed = [p for p in sorted(self.root.iterdir()) if p.name not in self._found and p.name != LOCK]
        _remove(removed)
        return removed

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
