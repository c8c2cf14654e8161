"""The HTTP side of ``difftune ui``: standard-library server, JSON API, static page, access checks.

Security, checked on every request:

- bound to 127.0.0.1 unless ``--host`` says otherwise; any other bind needs a token (given, or
  generated and printed), accepted as ``Authorization: Bearer``, the ``token`` query parameter of
  the printed URL (which sets a cookie) or that cookie;
- on a loopback bind the ``Host`` header must name the loopback (no DNS-rebinding pages);
- every change is a POST with a JSON body and an ``X-Difftune`` header, which a page of another
  site cannot send without a CORS pre-flight this server never grants;
- every path a client names is resolved inside the root (:class:`~difftune.ui.paths.Root`);
- the only processes started are ``difftune train`` on a validated config, and ``difftune
  generate`` / ``difftune convert`` on a run's own adapter, with arguments passed as a list.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import mimetypes
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import tomllib
import traceback
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from difftune.errors import DifftuneError
from difftune.ui import configs, jobs, runs, thumbs
from difftune.ui.paths import OutsideRoot, Root

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"index.html", "app.js", "style.css", "favicon.svg"}
MAX_BODY = 4 << 20
COOKIE = "difftune_token"


class NotFound(DifftuneError):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class App:
    """State shared by request threads: the root, the queue and its runner, the access token."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", token: str | None = None,
                 start_runner: bool = True) -> None:
        self.root = Root(root)
        self.host = host
        if not is_loopback(host) and not token:
            raise DifftuneError(f"--host {host}: a non-loopback address needs an access token")
        self.token = token
        self.queue = jobs.JobQueue(self.root.path)
        self.runner = jobs.Runner(self.queue)
        self._check_cache: dict[tuple, tuple[float, dict]] = {}
        self._checking: set[tuple] = set()
        self._check_errors: dict[tuple, str] = {}
        self._cache_lock = threading.Lock()
        if start_runner:
            self.runner.start()
        # The data check and config validation import torch and the registries (seconds, once): do it now,
        # in the background, rather than in the first request of the person who just opened the page.
        self.warm = threading.Thread(target=_warm_imports, name="difftune-ui-imports", daemon=True)
        self.warm.start()

    def close(self) -> None:
        self.runner.close()

    # --- data ---------------------------------------------------------------------------------

    def folders(self, rel: str) -> dict:
        folder = self.root.resolve(rel, must_exist=True)
        if not folder.is_dir():
            raise DifftuneError(f"{rel}: not a folder")
        from difftune.data.probe import IMAGE_SUFFIXES

        out = []
        for e in sorted(os.scandir(folder), key=lambda e: e.name):
            if e.name.startswith(".") or not e.is_dir():
                continue
            try:
                images = sum(1 for f in os.scandir(e.path) if os.path.splitext(f.name)[1].lower() in IMAGE_SUFFIXES)
            except OSError:
                images = 0
            out.append({"name": e.name, "path": self.root.rel(Path(e.path)), "images": images})
        return {"path": self.root.rel(folder), "folders": out}

    def image_files(self, rel: str) -> dict:
        """The image files of a folder (names only, read from the directory): the Data page shows them
        at once while the data check, which opens every file, runs."""
        from difftune.data.probe import IMAGE_SUFFIXES

        folder = self.root.resolve(rel, must_exist=True)
        names = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # as the data scan skips them
            base = Path(dirpath).relative_to(folder)
            names += [(base / f).as_posix() for f in filenames if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
        return {"folder": self.root.rel(folder), "images": sorted(names)}

    def data_check(self, rel: str, overrides: list[str], wait: bool = True) -> dict:
        """``difftune data check FOLDER --json`` (the same function), cached until the folder changes.

        ``wait=False`` starts the check in the background and answers ``{"status": "checking"}`` until
        it is done, then ``{"status": "ready", "report": ...}`` (a page polls instead of hanging).
        """
        folder = self.root.resolve(rel, must_exist=True)
        key = (str(folder), tuple(overrides))
        signature = _folder_signature(folder)
        with self._cache_lock:
            cached = self._check_cache.get(key)
            if cached and cached[0] == signature:
                return cached[1] if wait else {"status": "ready", "report": cached[1]}
            if not wait:
                error = self._check_errors.pop(key, None)
                if error:
                    raise DifftuneError(error)
                if key not in self._checking:
                    self._checking.add(key)
                    threading.Thread(target=self._check_in_background, args=(key, folder, overrides),
                                     daemon=True).start()
                return {"status": "checking"}
        return self._check(key, folder, overrides, signature)

    def _check_in_background(self, key, folder: Path, overrides: list[str]) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread can be niced; the page's requests go first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        try:
            self._check(key, folder, overrides, _folder_signature(folder))
        except DifftuneError as exc:
            with self._cache_lock:
                self._check_errors[key] = str(exc)
        finally:
            with self._cache_lock:
                self._checking.discard(key)

    def _check(self, key, folder: Path, overrides: list[str], signature: float) -> dict:
        from difftune.data.report import check_dataset, folder_config

        config = folder_config(self.root.rel(folder) or ".", overrides)
        report = check_dataset(config.data)
        for p in report["problems"]:  # show names relative to the root, as the data folder is
            p["name"] = self._relative_name(p["name"])
        report["folder"] = self.root.rel(folder)
        with self._cache_lock:
            self._check_cache[key] = (signature, report)
        return report

    def _relative_name(self, name: str) -> str:
        path = Path(name.split(":", 1)[0]) if not Path(name).exists() else Path(name)
        if path.is_absolute() and self.root.contains(path):
            return self.root.rel(path) + name[len(str(path)):]
        return name

    def set_caption(self, rel: str, name: str, caption: str) -> dict:
        from difftune.data.caption_edit import set_caption

        folder = self.root.resolve(rel, must_exist=True)
        written = set_caption(folder, name, caption)
        with self._cache_lock:
            self._check_cache.clear()
        return {"file": self.root.rel(written), "caption": caption.strip()}

    # --- configs ------------------------------------------------------------------------------

    def config_state(self, text: str, name: str = "run.toml") -> dict:
        try:
            values = configs.form_values(text)
        except tomllib.TOMLDecodeError:
            values = None
        return {"text": text, "values": values, "check": configs.check(text, self.root, name)}

    def open_config(self, rel: str | None, preset: str | None) -> dict:
        if preset:
            for p in configs.presets(self.root):
                if p["name"] == preset:
                    return {**self.config_state(p["text"], p["name"]), "name": p["name"]}
            raise NotFound(f"{preset}: no such preset")
        path = self.root.resolve(rel, must_exist=True)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DifftuneError(f"{rel}: not UTF-8 text; save the config as UTF-8") from None
        return {**self.config_state(text, path.name), "name": path.name, "path": self.root.rel(path)}

    def save_config(self, rel: str, text: str, overwrite: bool) -> dict:
        if not rel.endswith(".toml"):
            raise DifftuneError(f"{rel}: a config file name ends in .toml")
        path = self.root.resolve(rel)
        if path.exists() and not overwrite:
            raise DifftuneError(f"{rel} exists; tick 'overwrite' to replace it")
        from difftune.fileio import atomic_write_text

        atomic_write_text(path, text)
        return {"path": self.root.rel(path)}

    # --- queue --------------------------------------------------------------------------------

    def add_job(self, text: str, name: str | None) -> dict:
        check = configs.check(text, self.root)
        if not check["ok"]:
            raise DifftuneError(check["message"])
        from difftune.run_config import load_config

        config = load_config(data=tomllib.loads(text))
        run_dir = self.root.resolve(config.output.dir) if not Path(config.output.dir).is_absolute() else \
            Path(config.output.dir).resolve()
        if config.train.resume:
            raise DifftuneError("train.resume: leave it unset when queueing; use Resume on a stopped run")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise DifftuneError(f"output.dir: {config.output.dir} already holds files (another run's results); "
                                "choose a new folder")
        job_id = self.queue.add(name or run_dir.name, text, run_dir)
        self.runner.wake.set()
        return {"id": job_id}

    def job_action(self, job_id: int, action: str) -> dict:
        job = self.queue.get(job_id)
        if action == "stop":
            self.runner.stop(job_id)
        elif action == "resume":
            if job["status"] not in ("stopped", "failed"):
                raise DifftuneError(f"job {job_id} is {job['status']}; only a stopped or failed run resumes")
            if not runs.checkpoints(Path(job["run_dir"])):
                raise DifftuneError(f"job {job_id}: no checkpoint in {self.root.rel(Path(job['run_dir']))}/checkpoints "
                                    "to resume from; re-queue it to start again")
            self.queue.requeue_at_end(job_id, resume=1)
        elif action == "requeue":
            if job["status"] not in jobs.FINISHED:
                raise DifftuneError(f"job {job_id} is {job['status']}; re-queue a finished, stopped or failed run")
            return self._requeue(job)
        elif action == "delete":
            if job["status"] in ("running", "stopping"):
                raise DifftuneError(f"job {job_id} is running; stop it first")
            self.queue.delete(job_id)
        else:
            raise NotFound(f"{action}: unknown action")
        self.runner.wake.set()
        return {"id": job_id}

    def _requeue(self, job: dict) -> dict:
        """The same config again from step 0, into a new output folder (the old results stay)."""
        from difftune.ui.toml_edit import set_value

        text = Path(job["config"]).read_text(encoding="utf-8")
        old = Path(job["run_dir"])
        n = 2
        while (old.parent / f"{old.name}-{n}").exists() or any(j["run_dir"] == str(old.parent / f"{old.name}-{n}")
                                                               for j in self.queue.all()):
            n += 1
        new_dir = self.root.rel(old.parent / f"{old.name}-{n}")
        return self.add_job(set_value(text, "output", "dir", new_dir), f"{job['name']}-{n}")

    def job_list(self) -> list[dict]:
        out = []
        for job in self.queue.all():
            run = Path(job["run_dir"])
            out.append({**job, "run": self.root.rel(run), "config": self.root.rel(Path(job["config"])),
                        "progress": runs.summary(self.root, run, job)})
        return out

    # --- runs ---------------------------------------------------------------------------------

    def run_list(self) -> list[dict]:
        by_dir = {}
        for job in self.queue.all():
            by_dir[job["run_dir"]] = job  # the newest job of a folder wins
        folders = {str(p): p for p in runs.discover(self.root)}
        for d in by_dir:
            folders.setdefault(d, Path(d))
        out = [runs.summary(self.root, p, by_dir.get(key)) for key, p in folders.items()]
        return sorted(out, key=lambda r: -(r["updated"] or 0))

    def run_folder(self, rel: str) -> Path:
        run = self.root.resolve(rel)
        if not runs.is_run_folder(run) and str(run) not in {j["run_dir"] for j in self.queue.all()}:
            raise NotFound(f"{rel}: not a run folder")
        return run

    def run_detail(self, rel: str, offset: int) -> dict:
        run = self.run_folder(rel)
        detail = runs.detail(self.root, run, offset)
        job = next((j for j in reversed(self.queue.all()) if j["run_dir"] == str(run)), None)
        detail["job"] = None
        if job:
            log = self.queue.log_path(job["id"])
            detail["job"] = {"id": job["id"], "status": job["status"], "message": job["message"]}
            detail["log"] = _tail(log, 12000)
        else:
            detail["log"] = None
        return detail

    def compare(self, rels: list[str]) -> dict:
        if len(rels) < 2:
            raise DifftuneError("compare: choose two or more runs")
        folders = [self.run_folder(r) for r in rels]
        details = [runs.detail(self.root, f) for f in folders]
        return {"runs": details, "differences": runs.config_differences([runs.read_config(f) for f in folders])}

    def convert_kohya(self, rel: str) -> dict:
        """``difftune convert RUN --to kohya`` into ``RUN/export/NAME-kohya.safetensors``."""
        run = self.run_folder(rel)
        adapter = runs.adapter_file(run)
        if adapter is None or adapter.name != "pytorch_lora_weights.safetensors":
            raise DifftuneError(f"{rel}: no LoRA adapter to convert (the run has not finished, or trained no LoRA)")
        out = run / "export" / f"{run.name}-kohya.safetensors"
        if not (out.is_file() and out.stat().st_mtime >= adapter.stat().st_mtime):
            out.parent.mkdir(exist_ok=True)
            _difftune(["convert", str(adapter), "--to", "kohya", "-o", str(out)], self.root.path, timeout=600)
        return {"file": self.root.rel(out)}

    def generate(self, rel: str, prompt: str, seed: int, steps: int, guidance: float, weight: float) -> dict:
        """``difftune generate`` with the run's base model and adapter; images under ``RUN/generated/N``."""
        run = self.run_folder(rel)
        adapter = runs.adapter_file(run)
        if adapter is None or adapter.name != "pytorch_lora_weights.safetensors":
            raise DifftuneError(f"{rel}: no LoRA adapter yet (the run has not finished)")
        model = (runs.read_config(run).get("model") or {}).get("path")
        if not model:
            raise DifftuneError(f"{rel}/config.toml: no model.path")
        if not prompt.strip():
            raise DifftuneError("prompt: give a prompt")
        for name, value, lo, hi in (("seed", seed, 0, 2**31), ("steps", steps, 1, 200), ("guidance", guidance, 0, 50),
                                    ("weight", weight, -4, 4)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
                raise DifftuneError(f"{name}: {value!r} is not between {lo} and {hi}")
        base = run / "generated"
        n = 1 + max((int(p.name) for p in base.glob("*") if p.name.isdigit()), default=0)
        out = base / str(n)
        _difftune(["generate", "--model", model, "--lora", f"{run}:{weight}", "--prompt", prompt, "--seed", str(int(seed)),
                   "--steps", str(int(steps)), "--guidance", str(float(guidance)), "--out", str(out)],
                  self.root.path, timeout=1800)
        return {"images": [self.root.rel(p) for p in sorted(out.glob("*.png")) if p.name != "grid.png"]}


def _warm_imports() -> None:
    import difftune.data.caption_edit  # noqa: F401
    import difftune.data.report  # noqa: F401
    from difftune.ui import configs as ui_configs

    ui_configs.schema_description()


def _difftune(args: list[str], cwd: Path, timeout: float) -> str:
    """Run a difftune CLI command (arguments as a list, never a shell); its error line becomes the error."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "difftune", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        raise DifftuneError(f"difftune {args[0]} took longer than {timeout:.0f} s; stopped") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if line.startswith("difftune: error:")), lines[-1] if lines else "")
        raise DifftuneError(error.removeprefix("difftune: error: ") or f"difftune {args[0]} failed")
    return done.stdout


def _folder_signature(folder: Path) -> float:
    """Changes when an image or caption is added, removed or edited (folder and caption-file times)."""
    newest = folder.stat().st_mtime
    for e in os.scandir(folder):
        if e.name == "metadata.jsonl" or e.name.endswith(".txt") or e.is_dir():
            newest = max(newest, e.stat().st_mtime)
    return newest


def _tail(path: Path, limit: int) -> str | None:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - limit))
            data = fh.read()
    except OSError:
        return None
    text = data.decode("utf-8", errors="replace")
    # tqdm redraws its bar with carriage returns: keep the last state of each line
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


class Handler(BaseHTTPRequestHandler):
    server_version = "difftune-ui"
    app: App

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        if os.environ.get("DIFFTUNE_UI_ACCESS_LOG"):
            super().log_message(format, *args)

    # --- plumbing -----------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
                         "connect-src 'self'; frame-ancestors 'none'")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data, status: int = 200, extra: dict | None = None) -> None:
        self._send(status, json.dumps(data, default=str).encode(), "application/json; charset=utf-8",
                   {"Cache-Control": "no-store", **(extra or {})})

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _allowed(self) -> tuple[bool, dict]:
        """Host and token checks; returns (allowed, headers to add, e.g. the token cookie)."""
        app = self.app
        if is_loopback(app.host):
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0] if not (self.headers.get("Host") or "").startswith("[") \
                else (self.headers.get("Host") or "").split("]")[0] + "]"
            if host not in ("127.0.0.1", "localhost", "[::1]", app.host):
                self._error(HTTPStatus.FORBIDDEN, f"Host {self.headers.get('Host')!r} refused: open the app at its "
                                                  "127.0.0.1 address")
                return False, {}
        if not app.token:
            return True, {}
        given = []
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given.append(auth[7:].strip())
        query = parse_qs(urlsplit(self.path).query)
        given += query.get("token", [])
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        if COOKIE in cookie:
            given.append(cookie[COOKIE].value)
        if any(hmac.compare_digest(g.encode(), app.token.encode()) for g in given):
            extra = {}
            if "token" in query:
                extra["Set-Cookie"] = f"{COOKIE}={app.token}; HttpOnly; SameSite=Strict; Path=/"
            return True, extra
        self._error(HTTPStatus.UNAUTHORIZED, "access token missing or wrong: open the URL that difftune ui printed")
        return False, {}

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed")

    do_DELETE = do_PUT  # noqa: N815
    do_PATCH = do_PUT  # noqa: N815

    def _dispatch(self, method: str) -> None:
        ok, extra = self._allowed()
        if not ok:
            return
        self._extra = extra
        url = urlsplit(self.path)
        query = {k: v for k, v in parse_qs(url.query).items()}
        try:
            if method == "POST":
                if self.headers.get("X-Difftune") != "1":
                    raise PermissionError("POST requests need the X-Difftune header (sent by the app's page)")
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise DifftuneError("request too large")
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    raise DifftuneError("the request body is not JSON") from None
                if not isinstance(body, dict):
                    raise DifftuneError("the request body must be a JSON object")
                self._post(url.path, body)
            else:
                self._get(url.path, query)
        except OutsideRoot as exc:
            self._error(HTTPStatus.FORBIDDEN, str(exc))
        except PermissionError as exc:
            self._error(HTTPStatus.FORBIDDEN, str(exc))
        except NotFound as exc:
            self._error(HTTPStatus.NOT_FOUND, str(exc))
        except DifftuneError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            traceback.print_exc()
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")

    # --- routes -------------------------------------------------------------------------------

    def _get(self, path: str, q: dict) -> None:
        app = self.app
        one = lambda name, default="": q.get(name, [default])[0]  # noqa: E731
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if path == "/file":
            return self._file(one("path"), download=one("download") == "1")
        if path == "/thumb":
            return self._thumb(one("path"), int(one("size", "160") or 160))
        routes = {
            "/api/info": lambda: {"root": str(app.root.path), "version": _version(), "host": app.host},
            "/api/folders": lambda: app.folders(one("path")),
            "/api/data/files": lambda: app.image_files(one("path")),
            "/api/schema": configs.schema_description,
            "/api/presets": lambda: [{k: p[k] for k in ("name", "description")} for p in configs.presets(app.root)],
            "/api/jobs": app.job_list,
            "/api/runs": app.run_list,
            "/api/run": lambda: app.run_detail(one("run"), int(one("offset", "0") or 0)),
            "/api/compare": lambda: app.compare(q.get("run", [])),
        }
        if path not in routes:
            raise NotFound(f"{path}: not found")
        self._json(routes[path](), extra=self._extra)

    def _post(self, path: str, b: dict) -> None:
        app = self.app
        m = re.fullmatch(r"/api/jobs/(\d+)/(stop|resume|requeue|delete)", path)
        if m:
            return self._json(app.job_action(int(m.group(1)), m.group(2)))
        routes = {
            "/api/data/check": lambda: app.data_check(_str(b, "path"), _list(b, "set"), b.get("wait", True) is not False),
            "/api/data/caption": lambda: app.set_caption(_str(b, "path"), _str(b, "name"), _str(b, "caption")),
            "/api/config/open": lambda: app.open_config(b.get("path"), b.get("preset")),
            "/api/config/edit": lambda: app.config_state(
                configs.edit(_str(b, "text"), _str(b, "key"), b.get("value")), _str(b, "name") or "run.toml"),
            "/api/config/parse": lambda: app.config_state(_str(b, "text"), _str(b, "name") or "run.toml"),
            "/api/config/save": lambda: app.save_config(_str(b, "path"), _str(b, "text"), bool(b.get("overwrite"))),
            "/api/jobs": lambda: app.add_job(_str(b, "text"), b.get("name") or None),
            "/api/run/convert": lambda: app.convert_kohya(_str(b, "run")),
            "/api/run/generate": lambda: app.generate(_str(b, "run"), _str(b, "prompt"), b.get("seed", 0),
                                                      b.get("steps", 20), b.get("guidance", 5.0), b.get("weight", 1.0)),
        }
        if path not in routes:
            raise NotFound(f"{path}: not found")
        if path == "/api/config/edit" and not isinstance(b.get("value"), (str, type(None))):
            raise DifftuneError("value: a string or null")
        try:
            result = routes[path]()
        except tomllib.TOMLDecodeError as exc:
            raise DifftuneError(f"not valid TOML: {exc}") from None
        self._json(result)

    def _static(self, name: str) -> None:
        if name not in STATIC_FILES:
            raise NotFound(f"{name}: not found")
        body = (STATIC / name).read_bytes()
        ctype = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}[
            Path(name).suffix] + "; charset=utf-8"
        self._send(200, body, ctype, {"Cache-Control": "no-cache", **self._extra})

    def _file(self, rel: str, download: bool) -> None:
        path = self.app.root.resolve(rel, must_exist=True)
        if not path.is_file():
            raise NotFound(f"{rel}: not a file")
        if jobs.STATE_DIR in Path(self.app.root.rel(path)).parts[:1]:
            raise PermissionError(f"{rel}: the app's own state is not served")
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or path.suffix in (".toml", ".jsonl", ".md", ".json", ".log"):
            ctype = "text/plain; charset=utf-8"  # never rendered as a page of this origin
        if ctype in ("image/svg+xml",) or not (ctype.startswith(("image/", "text/plain")) or download):
            download = True
        extra = {"Cache-Control": "no-cache"}
        if download:
            extra["Content-Disposition"] = f"attachment; filename=\"{_header_safe(path.name)}\""
            ctype = "application/octet-stream" if not ctype.startswith("text/plain") else ctype
        self._send(200, path.read_bytes(), ctype, extra)

    def _thumb(self, rel: str, size: int) -> None:
        path = self.app.root.resolve(rel, must_exist=True)
        if not path.is_file():
            raise NotFound(f"{rel}: not a file")
        try:
            out = thumbs.thumbnail(path, self.app.queue.state / "thumbs", size)
        except (OSError, ValueError, Exception) as exc:  # noqa: BLE001 - a bad image gets a 415, not a 500
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"{rel}: cannot make a thumbnail ({type(exc).__name__})")
            return
        self._send(200, out.read_bytes(), "image/jpeg", {"Cache-Control": "max-age=3600"})


def _header_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _str(body: dict, key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise DifftuneError(f"{key}: expected a string")
    return value


def _list(body: dict, key: str) -> list[str]:
    value = body.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DifftuneError(f"{key}: expected a list of strings")
    return value


def _version() -> str:
    from difftune import __version__

    return __version__


def make_server(app: App, port: int = 0, bind: str | None = None) -> ThreadingHTTPServer:
    """An HTTP server for ``app`` on ``app.host:port`` (0 picks a free port; ``bind`` overrides the address)."""
    handler = type("BoundHandler", (Handler,), {"app": app})
    family_host = (bind or app.host).strip("[]")
    server_cls = ThreadingHTTPServer
    if ":" in family_host:
        import socket

        server_cls = type("V6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    server = server_cls((family_host, port), handler)
    server.daemon_threads = True
    return server


def url_of(server: ThreadingHTTPServer, app: App) -> str:
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    return f"http://{shown}:{port}/" + (f"?token={app.token}" if app.token else "")


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 7860, token: str | None = None) -> int:
    """``difftune ui``: serve until Ctrl-C. Runs in progress keep going after the server stops."""
    if not 0 <= port <= 65535:
        raise DifftuneError(f"--port {port}: not a port number (0 to 65535; 0 picks a free one)")
    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(24)
    app = App(root, host, token)
    os.chdir(app.root.path)  # config paths are relative to the root, as for `difftune train` run there
    try:
        server = make_server(app, port)
    except OSError as exc:
        app.close()
        raise DifftuneError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
    print(f"difftune ui: serving {app.root.path}")
    print(f"open {url_of(server, app)}", flush=True)
    if token and not is_loopback(host):
        print("anyone who can reach this address and has the token can start runs; keep the URL private")
    # Ctrl-C and SIGTERM stop the server the same way, also when it was started with SIGINT ignored
    # (a shell's background job, a service manager).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()
        active = app.queue.active()
        if active:
            print(f"difftune ui: stopped; run {active['name']} goes on (a new `difftune ui` here shows it)")
        time.sleep(0)
    return 0
