"""A web app on 127.0.0.1 over a temporary root holding a tiny model and a small dataset."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from difftune.ui.server import App, make_server


class Client:
    """JSON over HTTP to a running app, as the page's script talks to it."""

    def __init__(self, base: str, headers: dict | None = None) -> None:
        self.base = base
        self.headers = headers or {}

    def request(self, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict | bytes]:
        data = None if body is None else json.dumps(body).encode()
        h = {**self.headers, **(headers or {})}
        if body is not None:
            h = {"Content-Type": "application/json", "X-Difftune": "1", **h}
        req = urllib.request.Request(self.base + path, data=data, headers=h, method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=120) as res:
                status, raw, ctype = res.status, res.read(), res.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, raw, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        return status, json.loads(raw) if ctype.startswith("application/json") else raw

    def get(self, path: str):
        status, data = self.request(path)
        assert status == 200, (path, status, data)
        return data

    def post(self, path: str, body: dict):
        status, data = self.request(path, body)
        assert status == 200, (path, status, data)
        return data


class Served:
    def __init__(self, root: Path, host: str = "127.0.0.1", token: str | None = None) -> None:
        self.app = App(root, host=host, token=token)
        self.server = make_server(self.app, 0, bind="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        self.client = Client(self.url.rstrip("/"))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.app.close()


def stop_leftover_runs(root: Path) -> None:
    """End any run process a test left behind (each started by this test's app)."""
    import os
    import signal
    import sqlite3

    db = root / ".difftune-ui" / "queue.sqlite"
    if not db.exists():
        return
    con = sqlite3.connect(db)
    for (pid,) in con.execute("SELECT pid FROM jobs WHERE pid IS NOT NULL"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    con.close()


@pytest.fixture
def ui_root(tmp_path, tiny_sd, monkeypatch) -> Path:
    """root/models/tiny-sd (a copy: a symlink out of the root would be refused) and root/data/shapes."""
    from difftune.tiny import make_tiny_dataset

    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(tiny_sd, root / "models" / "tiny-sd")
    make_tiny_dataset(root / "data" / "shapes", n=4, size=64)
    monkeypatch.chdir(root)  # `difftune ui` runs in its root; config paths are relative to it
    # Runs started by the app inherit this: one thread each keeps them quick on a CPU shared with other tests.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield root
    stop_leftover_runs(root)


@pytest.fixture
def served(ui_root):
    s = Served(ui_root)
    yield s
    s.close()


def tiny_config(out: str = "runs/a", steps: int = 8, **extra: str) -> str:
    """A TOML config for the tiny model and dataset under the test root."""
    sections = {
        "model": 'path = "models/tiny-sd"',
        "method": 'type = "lora"\nrank = 4',
        "data": 'path = "data/shapes"\nresolution = 32',
        "train": f"max_steps = {steps}\nlearning_rate = 1e-3\nlog_every = 2\ncheckpoint_every = 0\n"
                 'mixed_precision = "no"',
        "logging": 'report_to = "none"',
        "output": f'dir = "{out}"',
    }
    for name, text in extra.items():
        sections[name] = (sections.get(name, "") + "\n" + text).strip()
    return "version = 1\n" + "".join(f"\n[{k}]\n{v}\n" for k, v in sections.items())
