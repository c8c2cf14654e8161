"""The run queue: jobs in SQLite under the root, run one at a time as ``difftune train`` processes.

Each job is a validated config saved beside the database and an output folder. The runner
starts ``python -m difftune train CONFIG`` (``--set train.resume=latest`` to resume) in its own
session with the root as working directory, so a crash of the run cannot take the server down,
and a restart of the server neither stops the run nor loses the queue: a new server adopts a
run that is still going and starts the queued ones after it.

Stopping sends SIGINT, exactly what Ctrl-C does: the run finishes its step, writes a
checkpoint and exits with status 130.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from difftune.errors import DifftuneError
from difftune.training.progress import read_progress

STATE_DIR = ".difftune-ui"
FINISHED = ("done", "stopped", "failed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    status TEXT NOT NULL,
    resume INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    exit_code INTEGER,
    message TEXT,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    position REAL NOT NULL
)
"""


class JobQueue:
    """The jobs table and the files of each job (``STATE/jobs/ID/config.toml`` and ``train.log``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.state = self.root / STATE_DIR
        (self.state / "jobs").mkdir(parents=True, exist_ok=True)
        self.db = self.state / "queue.sqlite"
        self._lock = threading.Lock()
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self):
        con = sqlite3.connect(self.db, timeout=30)
        con.row_factory = sqlite3.Row
        try:
            with con:
                yield con
        finally:
            con.close()

    def folder(self, job_id: int) -> Path:
        return self.state / "jobs" / str(job_id)

    def log_path(self, job_id: int) -> Path:
        return self.folder(job_id) / "train.log"

    def add(self, name: str, config_text: str, run_dir: Path) -> int:
        with self._lock, self._connect() as con:
            busy = con.execute("SELECT id FROM jobs WHERE run_dir = ? AND status NOT IN ('done', 'stopped', 'failed')",
                               (str(run_dir),)).fetchone()
            if busy:
                raise DifftuneError(f"output.dir: job {busy['id']} already writes to {run_dir}; choose another folder")
            position = (con.execute("SELECT MAX(position) FROM jobs").fetchone()[0] or 0) + 1
            now = time.time()
            cur = con.execute(
                "INSERT INTO jobs (name, config, run_dir, status, created, position) VALUES (?, '', ?, 'queued', ?, ?)",
                (name, str(run_dir), now, position))
            job_id = cur.lastrowid
            config = self.folder(job_id) / "config.toml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(config_text, encoding="utf-8")
            con.execute("UPDATE jobs SET config = ? WHERE id = ?", (str(config), job_id))
        return job_id

    def get(self, job_id: int) -> dict:
        with self._connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise DifftuneError(f"job {job_id}: no such job")
        return dict(row)

    def all(self) -> list[dict]:
        with self._connect() as con:
            return [dict(r) for r in con.execute("SELECT * FROM jobs ORDER BY position")]

    def update(self, job_id: int, **values) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._lock, self._connect() as con:
            con.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values.values(), job_id))

    def next_queued(self) -> dict | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY position LIMIT 1").fetchone()
        return dict(row) if row else None

    def active(self) -> dict | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE status IN ('running', 'stopping') LIMIT 1").fetchone()
        return dict(row) if row else None

    def requeue_at_end(self, job_id: int, **values) -> None:
        with self._lock, self._connect() as con:
            position = (con.execute("SELECT MAX(position) FROM jobs").fetchone()[0] or 0) + 1
            sets = "".join(f", {k} = ?" for k in values)
            con.execute(f"UPDATE jobs SET status = 'queued', position = ?, pid = NULL, exit_code = NULL, "
                        f"message = NULL, ended = NULL{sets} WHERE id = ?", (position, *values.values(), job_id))

    def delete(self, job_id: int) -> None:
        with self._lock, self._connect() as con:
            con.execute("DELETE FROM jobs WHERE id = ?", (job_id,))


def train_command(job: dict) -> list[str]:
    """The only process the web app starts for a run: ``difftune train`` on the job's validated config."""
    argv = [sys.executable, "-m", "difftune", "train", job["config"]]
    if job["resume"]:
        argv += ["--set", "train.resume=latest"]
    return argv


class Runner:
    """Starts queued jobs one at a time and records how they end; one per root (a lock file)."""

    def __init__(self, queue: JobQueue, interval: float = 0.5) -> None:
        self.queue = queue
        self.interval = interval
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock_file = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="difftune-ui-runner", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop watching; running jobs go on (a later server adopts them)."""
        self._stop.set()
        self.wake.set()
        if self._thread:
            self._thread.join(timeout=10)
        if self._lock_file:
            self._lock_file.close()
            self._lock_file = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._own_the_queue():
                try:
                    self.tick()
                except Exception as exc:  # noqa: BLE001 - the runner must outlive any one bad job
                    print(f"difftune ui: runner: {type(exc).__name__}: {exc}", file=sys.stderr)
            self.wake.wait(self.interval)
            self.wake.clear()

    def _own_the_queue(self) -> bool:
        """Only one server per root starts runs (a second one only shows them)."""
        if self._lock_file:
            return True
        fh = open(self.queue.state / "runner.lock", "a+")  # noqa: SIM115 - held for the runner's life
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self._lock_file = fh
        return True

    def tick(self) -> None:
        """Record a run that ended, then start the next queued job if nothing runs."""
        active = self.queue.active()
        if active is not None:
            ended = self._ended(active)
            if ended is None:
                return
            status, code, message = ended
            self.queue.update(active["id"], status=status, exit_code=code, message=message, ended=time.time(), pid=None)
            self._procs.pop(active["id"], None)
        job = self.queue.next_queued()
        if job is not None:
            self._launch(job)

    def _ended(self, job: dict) -> tuple[str, int | None, str | None] | None:
        """(status, exit code, message) if the job's process has ended, else None."""
        proc = self._procs.get(job["id"])
        if proc is not None:
            code = proc.poll()
            if code is None:
                return None
            return _outcome(code, job, self.queue.log_path(job["id"]))
        if job["pid"] and _same_run(job["pid"], job["config"]):
            return None  # started by an earlier server and still going
        state = read_progress(Path(job["run_dir"]) / "logs") or {}
        status = {"done": "done", "stopped": "stopped"}.get(state.get("status"), "failed")
        message = None if status != "failed" else "the run ended while no server was watching it, without finishing"
        return status, None, message

    def _launch(self, job: dict) -> None:
        log = self.queue.log_path(job["id"])
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "1"}
        with open(log, "ab") as out:
            out.write(f"$ difftune train {job['config']}{' --set train.resume=latest' if job['resume'] else ''}\n"
                      .encode())
            out.flush()
            proc = subprocess.Popen(train_command(job), cwd=self.queue.root, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self._procs[job["id"]] = proc
        self.queue.update(job["id"], status="running", pid=proc.pid, started=time.time())

    def stop(self, job_id: int) -> None:
        """SIGINT to the run (as Ctrl-C): it checkpoints and exits 130."""
        job = self.queue.get(job_id)
        if job["status"] != "running" or not job["pid"]:
            raise DifftuneError(f"job {job_id} is {job['status']}, not running")
        if not _same_run(job["pid"], job["config"]):
            raise DifftuneError(f"job {job_id}: its process has ended")
        os.kill(job["pid"], signal.SIGINT)
        self.queue.update(job_id, status="stopping")
        self.wake.set()


def _outcome(code: int, job: dict, log: Path) -> tuple[str, int, str | None]:
    if code == 0:
        return "done", code, None
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        return "stopped", code, "stopped with a checkpoint; resume continues from it"
    return "failed", code, last_error(log) or f"difftune train exited with status {code}"


_ERROR = re.compile(r"^(difftune: error: .*|\w*(Error|Exception)\b.*)$")


def last_error(log: Path) -> str | None:
    """The last ``difftune: error:`` line (or exception line) of a run's log."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()[-200:]
    except OSError:
        return None
    for line in reversed(lines):
        if _ERROR.match(line.strip()):
            return line.strip()
    return None


def _same_run(pid: int, config: str) -> bool:
    """True if ``pid`` is alive and is the ``difftune train`` of this config (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":  # a zombie has ended
                return False
    except (OSError, IndexError):
        return False
    return b"train" in cmdline and config.encode() in cmdline
