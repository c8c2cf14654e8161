"""In a real browser (headless Chromium): check data, configure from a preset, queue, watch, stop, resume,
a run started from the CLI showing up live, compare, download the adapter, convert and generate.

Screenshots of every stage are saved under build/ui-screenshots/ (printed at the end of the run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tests.ui.conftest import Served, tiny_config

pytestmark = pytest.mark.slow

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]
SHOTS = Path(__file__).resolve().parents[2] / "build" / "ui-screenshots"


@pytest.fixture
def browser():
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing; .ci/run installs them (apt-get install chromium "
                        "chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="difftune-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


class Page:
    """Small helpers over the driver: wait for a condition, read, click, type, screenshot."""

    def __init__(self, driver, base: str) -> None:
        self.d, self.base = driver, base
        SHOTS.mkdir(parents=True, exist_ok=True)

    def go(self, fragment: str) -> None:
        self.d.get(self.base + "#" + fragment)

    def find(self, css: str):
        return self.d.find_element("css selector", css)

    def all(self, css: str):
        return self.d.find_elements("css selector", css)

    def wait(self, condition, what: str, timeout: float = 240.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = condition()
            except Exception:  # noqa: BLE001 - the element may not exist yet
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                self.shot(f"timeout-{what.replace(' ', '-')}")
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.25)

    def text(self, css: str) -> str:
        """An element's text, read again if the page replaced the element meanwhile (it re-renders as it polls)."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

        for _ in range(50):
            try:
                return self.find(css).text
            except (StaleElementReferenceException, NoSuchElementException):
                time.sleep(0.1)
        return self.find(css).text

    def status(self) -> str:
        return self.wait(lambda: self.find('#watch-status [data-status]').get_attribute("data-status"), "the status")

    def type_into(self, key: str, value: str) -> None:
        field = self.find(f'[data-key="{key}"]:not(.field)')
        section = self.d.execute_script("return arguments[0].closest('details')", field)
        if section.get_attribute("open") is None:  # a closed section: open it as a person would
            section.find_element("css selector", "summary").click()
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
        if field.tag_name == "select":
            from selenium.webdriver.support.ui import Select

            Select(field).select_by_value(value)
        else:  # as a person does: click into the field, select what is there, type over it
            from selenium.webdriver.common.keys import Keys

            field.click()
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(value)

    def shot(self, name: str, full: bool = False) -> Path:
        """A screenshot of the window, or of the whole page (``full``) for the long ones."""
        import base64

        path = SHOTS / f"{name}.png"
        if not full:
            self.d.save_screenshot(str(path))
            return path
        size = self.d.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = self.d.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


def test_a_first_time_user_trains_a_lora_from_the_browser(browser, ui_root):
    served = Served(ui_root)
    page = Page(browser, served.url)
    cli_run = None
    try:
        # --- Data: pick the folder, read the report, fix a caption -------------------------------------
        page.go("data")
        page.wait(lambda: page.find('[data-folder="data"]'), "the data folder").click()
        page.wait(lambda: page.find('[data-folder="data/shapes"]'), "the shapes folder").click()
        page.wait(lambda: page.text("#data-folder") == "/data/shapes", "the folder to open")
        page.find("#data-check").click()
        page.wait(lambda: page.text('[data-testid="data-usable"]') == "4", "the data check report")
        tile = page.find('.tile[data-name="img_000.png"]')
        tile.find_element("css selector", '[data-testid="edit-caption"]').click()
        box = tile.find_element("css selector", '[data-testid="caption-input"]')
        box.clear()
        box.send_keys("a bright red circle")
        tile.find_element("css selector", '[data-testid="save-caption"]').click()
        page.wait(lambda: "a bright red circle" in page.find('.tile[data-name="img_000.png"] .caption').text,
                  "the caption to save")
        metadata = (ui_root / "data" / "shapes" / "metadata.jsonl").read_text()
        assert json.loads(metadata.splitlines()[0])["text"] == "a bright red circle"
        page.wait(lambda: all(img.get_attribute("naturalWidth") not in (None, "0")
                              for img in page.all("#data-images img")), "the thumbnails")
        page.shot("01-data")

        # --- Configure: a preset, edited in the form, checked as it is typed -----------------------------
        page.go("configure")
        from selenium.webdriver.support.ui import Select

        page.wait(lambda: len(page.all("#cfg-preset option")) > 5, "the presets")
        Select(page.find("#cfg-preset")).select_by_value("sd15-lora.toml")
        page.find("#cfg-load-preset").click()
        page.wait(lambda: "sd15-lora.toml: ok" in page.text("#cfg-check"), "the preset to load")
        edits = {"model.path": "difftune:shapes", "data.path": "data/shapes", "data.resolution": "64",
                 "train.batch_size": "2", "train.max_steps": "60", "train.learning_rate": "1e-3",
                 "train.mixed_precision": "no", "train.log_every": "2", "validation.every": "10", "validation.steps": "2",
                 "validation.prompts": "a red circle", "validation.holdout": "0.25", "validation.loss_every": "10", "logging.report_to": "none", "output.dir": "runs/first"}
        for key, value in edits.items():
            page.type_into(key, value)
        page.wait(lambda: page.find("#cfg-check").get_attribute("data-busy") is None, "the edits")
        message = page.text("#cfg-check")
        assert message == "train.warmup_steps: 100 is more than train.max_steps (60)"  # the CLI's message
        assert page.find("#cfg-queue").get_attribute("disabled") is not None
        page.shot("02-configure-error")
        page.type_into("train.warmup_steps", "5")
        page.type_into("train.max_steps", "60")
        page.wait(lambda: page.find("#cfg-check").get_attribute("data-busy") is None
                  and page.find("#cfg-check").get_attribute("data-ok") == "1", "a valid config")
        text = page.find("#cfg-text").get_attribute("value")
        assert text.startswith("# LoRA on Stable Diffusion 1.5") and 'path = "difftune:shapes"' in text
        assert "max_steps = 60" in text and "warmup_steps = 5" in text
        download = page.find("#cfg-download").get_attribute("href")
        assert download.startswith("blob:")
        page.shot("03-configure-ok")
        page.find("#cfg-job-name").send_keys("first")
        page.find("#cfg-queue").click()

        # --- Queue and Watch: live curve and samples; stop; resume ----------------------------------------
        page.wait(lambda: page.find('tr[data-job="1"]').get_attribute("data-status") == "running", "the run to start")
        page.shot("04-queue")
        page.go("watch/runs/first")
        page.wait(lambda: int(page.find("#watch-loss").get_attribute("data-points")) >= 2, "a loss curve")
        page.shot("05-watch-live")
        page.find("#watch-stop").click()  # early, so the run cannot finish first on a fast machine
        page.wait(lambda: page.find('#watch-status [data-status]').get_attribute("data-status") == "stopped",
                  "the run to stop", timeout=120)
        stopped_at = int(page.text('[data-testid="watch-step"]').split("/")[0])
        assert 0 < stopped_at < 60
        assert (ui_root / "runs" / "first" / "checkpoints" / f"step-{stopped_at}").is_dir()
        page.shot("06-watch-stopped")
        page.wait(lambda: page.find("#watch-resume").is_displayed(), "the resume button")
        page.find("#watch-resume").click()
        page.wait(lambda: int(page.find("#watch-samples").get_attribute("data-steps")) >= 1, "validation samples")
        page.wait(lambda: page.find('#watch-samples img').get_attribute("naturalWidth") not in (None, "0"),
                  "a sample image")
        if page.status() == "running":
            page.shot("06b-watch-resumed-live")
        page.wait(lambda: page.find('#watch-status [data-status]').get_attribute("data-status") == "done",
                  "the resumed run to finish")
        assert page.text('[data-testid="watch-step"]') == "60 / 60"
        assert page.all("#watch-loss circle.best") and "best" in page.text("#watch-loss")  # held-out best step
        assert f"resumed from runs/first/checkpoints/step-{stopped_at} at step {stopped_at}" in \
            page.find("#watch-log").get_attribute("textContent")
        page.shot("07-watch-done")

        # --- A run started from a terminal shows up live --------------------------------------------------
        cli_config = ui_root / "second.toml"
        cli_config.write_text(tiny_config("runs/second", steps=200, validation='prompts = ["a red circle"]\nevery = 100\n'
                                          "steps = 2").replace("learning_rate = 1e-3", "learning_rate = 5e-4"))
        cli_run = subprocess.Popen([sys.executable, "-m", "difftune", "train", "second.toml"], cwd=ui_root,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        page.go("watch")
        page.wait(lambda: "runs/second" in page.find("#watch-run").text, "the CLI run in the list", timeout=120)
        page.go("watch/runs/second")
        seen = set()  # (step) values the page showed while the run was running

        def live_twice():
            if page.status() == "running":
                seen.add(int(page.text('[data-testid="watch-step"]').split("/")[0]))
            return len(seen - {0}) >= 2 or cli_run.poll() is not None

        page.wait(live_twice, "the CLI run's progress")
        assert len(seen - {0}) >= 2, f"the page showed the CLI run running only at steps {seen}"
        page.shot("08-cli-run-live")
        assert cli_run.wait(timeout=300) == 0
        page.wait(lambda: page.find('#watch-status [data-status]').get_attribute("data-status") == "done",
                  "the CLI run to finish")

        # --- Compare ----------------------------------------------------------------------------------------
        page.go("compare")
        page.wait(lambda: len(page.all('#compare-picks input')) >= 2, "the run list")
        for box in page.all('#compare-picks input'):
            if box.get_attribute("value") in ("runs/first", "runs/second"):
                box.click()
        page.find("#compare-go").click()
        diff = page.wait(lambda: page.find('[data-testid="compare-diff"]'), "the config differences").text
        for key in ("train.learning_rate", "train.max_steps", "method.rank", "validation.holdout"):
            assert key in diff, diff
        assert int(page.find('[data-testid="compare-chart"]').get_attribute("data-points")) >= 60
        grid = page.find('[data-testid="compare-grid"]')
        assert len(grid.find_elements("css selector", "img")) >= 4  # steps 100 and 200 of the CLI run, 10 to 60 of the first
        page.shot("09-compare", full=True)

        # --- Results: download the adapter, convert to kohya, the model card, generate -------------------
        downloads = Path(tempfile.mkdtemp(prefix="difftune-downloads-"))
        browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        page.go("results/runs/first")
        page.wait(lambda: page.find('[data-testid="download-adapter"]'), "the adapter link").click()
        adapter = ui_root / "runs" / "first" / "pytorch_lora_weights.safetensors"
        got = page.wait(lambda: [p for p in downloads.glob("*.safetensors")], "the download")[0]
        page.wait(lambda: got.stat().st_size == adapter.stat().st_size, "the download to complete", timeout=30)
        assert got.read_bytes() == adapter.read_bytes()
        shutil.rmtree(downloads, ignore_errors=True)
        page.wait(lambda: "Steps" in page.text('[data-testid="results-card"]'), "the model card")
        page.find('[data-testid="convert-kohya"]').click()
        page.wait(lambda: page.find('[data-testid="kohya-link"]'), "the kohya file", timeout=180)
        from safetensors import safe_open

        with safe_open(ui_root / "runs" / "first" / "export" / "first-kohya.safetensors", "pt") as f:
            assert all(k.startswith("lora_unet_") for k in f.keys())  # noqa: SIM118 - safe_open is not iterable
        page.find("#gen-prompt").send_keys("a red circle")
        page.find("#gen-steps").clear()
        page.find("#gen-steps").send_keys("2")
        page.find("#gen-go").click()
        page.wait(lambda: page.find('#gen-images img').get_attribute("naturalWidth") not in (None, "0"),
                  "a generated image", timeout=180)
        assert list((ui_root / "runs" / "first" / "generated" / "1").glob("00-00-seed0.png"))
        page.shot("10-results", full=True)
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert logs == [], logs
    finally:
        if cli_run is not None and cli_run.poll() is None:
            cli_run.kill()
            cli_run.wait()
        served.close()
    print(f"\nui screenshots: {SHOTS}")


def _subject_run(run: Path, best: dict | None) -> None:
    """A finished run's files as a DreamBooth run with ``validation.holdout_word`` writes them: the held-out
    loss lowest at step 250, the word gain highest at 500 (the quality benchmark's subject task, docs/quality.md)."""
    losses = [0.085, 0.079, 0.15, 0.16, 0.21, 0.25, 0.22, 0.24]
    gains = [0.012, 0.017, 0.030, 0.056, 0.055, -0.010, 0.024, -0.014]
    rows = [{"step": s, "loss": 0.1} for s in range(25, 1001, 25)]
    rows += [{"step": 125 * (i + 1), "val_loss": v, "val_word_gain": g} for i, (v, g) in enumerate(zip(losses, gains,
                                                                                                        strict=True))]
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "logs" / "progress.json").write_text(json.dumps({"status": "done", "step": 1000, "total_steps": 1000}))
    (run / "config.toml").write_text(tiny_config("runs/stars", validation='holdout_word = "sks"'))
    (run / "checkpoints" / "step-500").mkdir(parents=True)
    if best is not None:
        (run / "checkpoints" / "best.json").write_text(json.dumps(best))


def test_the_run_chart_marks_the_checkpoint_the_run_marked_best(browser, ui_root):
    """With a holdout word the best checkpoint is the highest word gain, not the lowest held-out loss: the chart
    draws the gain and puts its marker where best.json points."""
    _subject_run(ui_root / "runs" / "stars", {"checkpoint": "step-500", "step": 500, "val_loss": 0.16,
                                              "word_gain": 0.056, "by": "word gain"})
    served = Served(ui_root)
    page = Page(browser, served.url)
    try:
        assert served.client.get("/api/run?run=runs/stars&offset=0")["best"]["step"] == 500
        page.go("watch/runs/stars")
        page.wait(lambda: int(page.find("#watch-loss").get_attribute("data-points")) >= 56, "the curves")
        chart = page.text("#watch-loss")
        assert "word gain" in chart and "best word gain 0.056 @ 500 (checkpoint)" in chart, chart
        assert len(page.all("#watch-loss circle.best")) == 1
        assert "@ 250" not in chart  # the lowest held-out loss is not what the run marked
        page.shot("11-watch-word-gain")
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert logs == [], logs
    finally:
        served.close()
