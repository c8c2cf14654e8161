"""How fast the web app's pages load with 10 runs and 1,000 images (target: under a second each).

Builds a root with a 1,000-image dataset and 10 finished run folders (metrics, samples, checkpoints,
queue entries), serves it on 127.0.0.1 and prints:

- each API call a page makes, cold (first call) and warm (median of 5);
- with headless Chromium (when /usr/bin/chromium and chromedriver exist), each page from navigation
  until its content is on screen: the Data page's report and first page of thumbnails, the Configure
  form with a preset, the queue table, the Watch charts and samples, Compare of all 10 runs, Results.

    python benchmarks/ui_pages.py [--images 1000] [--runs 10] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def build_root(root: Path, images: int, runs: int) -> None:
    from PIL import Image

    from difftune import load_config
    from difftune.config import config_to_dict, dump_toml
    from difftune.ui.jobs import JobQueue

    rng = random.Random(0)
    data = root / "data" / "photos"
    data.mkdir(parents=True)
    lines = []
    for i in range(images):
        name = f"img_{i:04d}.png"
        Image.new("RGB", (rng.choice([512, 640, 768]), rng.choice([512, 640, 768])),
                  tuple(rng.randrange(256) for _ in range(3))).save(data / name)
        lines.append(json.dumps({"file_name": name, "text": f"a photo number {i}, {rng.choice(['red', 'blue'])}"}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    queue = JobQueue(root)
    for r in range(runs):
        run = root / "runs" / f"run-{r:02d}"
        config = load_config(data={"model": {"path": "unused"}, "data": {"path": "data/photos"},
                                   "train": {"max_steps": 1000, "learning_rate": 1e-4 * (r + 1)},
                                   "validation": {"prompts": ["a red photo", "a blue photo"], "every": 100},
                                   "output": {"dir": f"runs/run-{r:02d}"}}, check_paths=False)
        (run / "logs").mkdir(parents=True)
        text = dump_toml(config_to_dict(config))
        (run / "config.toml").write_text(text)
        (run / "logs" / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 0.2 / (1 + s / 300) + rng.random() * 0.02, "lr": 1e-4}) + "\n"
            for s in range(10, 1001, 10)) + "".join(json.dumps({"step": s, "val_loss": 0.15 / (1 + s / 400)}) + "\n"
                                                      for s in range(100, 1001, 100)))
        (run / "logs" / "progress.json").write_text(json.dumps(
            {"status": "done", "step": 1000, "total_steps": 1000, "pid": 1, "started": time.time() - 3600,
             "updated": time.time() - r, "steps_per_second": 2.0, "eta_seconds": None}))
        for s in range(100, 1001, 100):
            folder = run / "samples" / f"step-{s}"
            folder.mkdir(parents=True)
            for p in range(2):
                Image.new("RGB", (256, 256), tuple(rng.randrange(256) for _ in range(3))).save(folder / f"{p:02d}-seed0.png")
        for s in (800, 900):
            (run / "checkpoints" / f"step-{s}").mkdir(parents=True)
        (run / "pytorch_lora_weights.safetensors").write_bytes(b"\0" * 1024)
        (run / "README.md").write_text("# LoRA\n\n| | |\n|---|---|\n| Steps | 1000 |\n")
        job_id = queue.add(f"run-{r:02d}", text, run)
        queue.update(job_id, status="done", exit_code=0)


def timed_get(url: str, body: dict | None = None) -> float:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "X-Difftune": "1"} if body is not None else {}
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=120) as res:
        res.read()
    return time.perf_counter() - start


def api_timings(base: str, images: int) -> list[tuple[str, float, float]]:
    calls = [
        ("page + script + style", None, ["/", "/static/app.js", "/static/style.css"]),
        ("/api/runs", None, ["/api/runs"]),
        ("/api/jobs", None, ["/api/jobs"]),
        ("/api/run (one run, all metrics)", None, ["/api/run?run=runs/run-00"]),
        ("/api/compare (10 runs)", None, ["/api/compare?" + "&".join(f"run=runs/run-{r:02d}" for r in range(10))]),
        ("/api/schema + /api/presets", None, ["/api/schema", "/api/presets"]),
        ("/api/folders", None, ["/api/folders?path=data"]),
        ("/api/data/files (names, for the page)", None, ["/api/data/files?path=data/photos"]),
        (f"/api/data/check ({images} images, full)", {"path": "data/photos"}, ["/api/data/check"]),
        ("48 thumbnails", None, [f"/thumb?size=160&path=data/photos/img_{i:04d}.png" for i in range(48)]),
    ]
    out = []
    for label, body, paths in calls:
        cold = sum(timed_get(base + p, body) for p in paths)
        warm = statistics.median(sum(timed_get(base + p, body) for p in paths) for _ in range(5))
        out.append((label, cold, warm))
    return out


def browser_timings(base: str) -> list[tuple[str, float]] | None:
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import Select

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    profile = tempfile.mkdtemp()
    options.add_argument(f"--user-data-dir={profile}")
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    find = lambda css: d.find_elements("css selector", css)  # noqa: E731

    def until(cond, limit=30.0):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            try:
                if cond():
                    return
            except Exception:  # noqa: BLE001, S110 - not there yet
                pass
            time.sleep(0.01)
        raise RuntimeError("page did not load")

    def thumbs_loaded():
        imgs = find("#data-images img")
        return len(imgs) == 48 and d.execute_script(
            "return [...document.querySelectorAll('#data-images img')].filter(i => i.getBoundingClientRect().top < "
            "innerHeight).every(i => i.complete && i.naturalWidth > 0)")

    out = []
    try:
        d.get(base + "#queue")  # the browser's own first start is not a page load: warm it up on another page
        until(lambda: find("#queue-rows tr"))
        for label, fragment, action, ready in [
            ("Data: 1,000 images listed, first 48 thumbnails on screen", "data/data/photos",
             lambda: find("#data-check")[0].click(), thumbs_loaded),
            ("Data: the full data check report (opens all 1,000 files)", "data/data/photos",
             lambda: find("#data-check")[0].click(), lambda: find('[data-testid="data-usable"]')),
            ("Configure: form + a preset", "configure",
             lambda: (until(lambda: len(find("#cfg-preset option")) > 3),
                      Select(find("#cfg-preset")[0]).select_by_index(1), find("#cfg-load-preset")[0].click()),
             lambda: find("#cfg-check")[0].get_attribute("data-ok") is not None),
            ("Queue: 10 jobs", "queue", None, lambda: len(find("#queue-rows tr[data-job]")) == 10),
            ("Watch: curves + samples", "watch/runs/run-00", None,
             lambda: int(find("#watch-loss")[0].get_attribute("data-points") or 0) >= 100 and all(
                 i.get_attribute("naturalWidth") not in (None, "0") for i in find("#watch-samples img"))
             and len(find("#watch-samples img")) == 2),
            ("Compare: the list of 10 runs", "compare", None, lambda: len(find("#compare-picks input")) == 10),
            ("Compare: 10 runs ticked, then Compare clicked until drawn", "compare",
             lambda: (until(lambda: len(find("#compare-picks input")) == 10),
                      d.execute_script("document.querySelectorAll('#compare-picks input').forEach(b => b.click())"),
                      find("#compare-go")[0].click()),
             lambda: int(find('[data-testid="compare-chart"]')[0].get_attribute("data-points")) >= 1000),
            ("Results: files + model card", "results/runs/run-00", None,
             lambda: "Steps" in find("#results-card")[0].text),
        ]:
            for attempt in ("cold", "warm"):
                d.get("about:blank")
                start = time.perf_counter()
                d.get(base + "#" + fragment)
                if action:
                    action()
                until(ready)
                out.append((f"{label} [{attempt}]", time.perf_counter() - start))
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--keep", default=None, help="build the root here and keep it")
    args = parser.parse_args()
    from difftune.ui.server import App, make_server

    root = Path(args.keep or tempfile.mkdtemp(prefix="difftune-ui-bench-"))
    if not (root / "runs").exists():
        print(f"building {args.images} images and {args.runs} runs in {root} ...", flush=True)
        build_root(root, args.images, args.runs)
    import os

    os.chdir(root)
    app = App(root, start_runner=False)
    server = make_server(app, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    app.warm.join()  # the imports a server does once in its first seconds (torch, registries) are not a page load
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        pages = browser_timings(base + "/")  # first, so its "cold" is cold (no cached check or thumbnails)
        app._check_cache.clear()
        shutil.rmtree(root / ".difftune-ui" / "thumbs", ignore_errors=True)
        print(f"\nAPI calls ({args.images} images, {args.runs} runs)          cold s    warm s")
        for label, cold, warm in api_timings(base, args.images):
            print(f"  {label:<40} {cold:8.3f}  {warm:8.3f}")
        if pages is None:
            print("\n(no /usr/bin/chromium + chromedriver: browser page timings skipped)")
        else:
            print("\nPages in headless Chromium, navigation to content on screen      s")
            for label, seconds in pages:
                print(f"  {label:<60} {seconds:6.3f}{'' if seconds < 1 else '  <- over 1 s'}")
    finally:
        server.shutdown()
        app.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
