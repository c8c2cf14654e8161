"""Queue and run: real `difftune train` processes, a crash, a server restart with a running and a queued job."""

from __future__ import annotations

import time

import pytest
from tests.ui.conftest import Served, tiny_config

from difftune.ui.server import App

pytestmark = pytest.mark.slow


def wait_for(fetch, ok, timeout=240.0, every=0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last value: {value}")
        time.sleep(every)


def job(client, job_id):
    return next(j for j in client.get("/api/jobs") if j["id"] == job_id)


def test_queue_survives_a_restart_and_a_crash_does_not_take_the_server_down(ui_root):
    broken = ui_root / "models" / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')  # validates, but
    (broken / "unet.bin").write_bytes(b"nothing")  # its weights are not a model, so the run fails
    first = Served(ui_root)
    c = first.client
    long_id = c.post("/api/jobs", {"text": tiny_config("runs/long", steps=100000), "name": "long"})["id"]
    crash_text = tiny_config("runs/crash").replace('path = "models/tiny-sd"', 'path = "models/broken"')
    crash_id = c.post("/api/jobs", {"text": crash_text})["id"]
    status, data = c.request("/api/jobs", {"text": tiny_config("runs/long")})
    assert status == 400 and "already writes to" in data["error"]
    running = wait_for(lambda: job(c, long_id), lambda j: (j["progress"]["step"] or 0) >= 1)
    assert running["status"] == "running" and job(c, crash_id)["status"] == "queued"  # one run at a time
    assert c.request(f"/api/jobs/{long_id}/delete", {})[0] == 400
    first.close()  # the server goes away; the run does not

    second = Served(ui_root)
    c = second.client
    try:
        adopted = job(c, long_id)
        assert adopted["status"] == "running" and job(c, crash_id)["status"] == "queued"
        step = adopted["progress"]["step"]
        wait_for(lambda: job(c, long_id), lambda j: j["progress"]["step"] > step)  # still live after the restart
        c.post(f"/api/jobs/{long_id}/stop", {})
        stopped = wait_for(lambda: job(c, long_id), lambda j: j["status"] == "stopped")
        detail = c.get("/api/run?run=runs/long")
        assert detail["checkpoints"] == [f"step-{detail['progress']['step']}"]
        assert detail["progress"]["status"] == "stopped" and stopped["progress"]["status"] == "stopped"

        failed = wait_for(lambda: job(c, crash_id), lambda j: j["status"] in ("failed", "done"))
        assert failed["status"] == "failed" and failed["exit_code"] == 1
        assert "models/broken: could not load unet" in failed["message"]
        assert not (ui_root / "runs" / "crash").exists()  # nothing written before the model loaded
        assert c.get("/api/info")["root"] == str(ui_root)  # the server is fine
        status, data = c.request(f"/api/jobs/{crash_id}/resume", {})
        assert status == 400 and "no checkpoint" in data["error"]
    finally:
        second.close()

    # Queue actions without a runner, so nothing starts underneath the checks.
    app = App(ui_root, start_runner=False)
    try:
        new = app.job_action(long_id, "requeue")
        queued = app.queue.get(new["id"])
        assert queued["status"] == "queued" and queued["run_dir"].endswith("runs/long-2")
        assert 'dir = "runs/long-2"' in (ui_root / queued["config"]).read_text()
        app.job_action(long_id, "resume")
        assert app.queue.get(long_id)["status"] == "queued" and app.queue.get(long_id)["resume"] == 1
        app.job_action(new["id"], "delete")
        assert [j["id"] for j in app.queue.all()] == [crash_id, long_id]
        assert (ui_root / "runs" / "long" / "checkpoints").is_dir()  # deleting a job keeps files
    finally:
        app.close()
