"""``benchmarks/quality.py --jobs N``: the tasks split over N worker processes side by side.

The embedded base is small (a 4.6 M-parameter UNet on 16×16 latents): on a 2-core CPU one training
process runs about as fast with 1 torch thread as with 2 (measured on a 2-core AMD EPYC: a UNet
forward and backward at batch 4 in 170 ms with 1 thread, 177 ms with 2), and two such processes side
by side do not slow each other. So ``--jobs 2`` (1 thread each) does the whole benchmark in about half
the wall time of one process with 2 threads.

Each job is ``quality.py`` itself in a child process with its share of the tasks (whole tasks: every
seed of a task, difftune's run and the script's, stays in one job, so the two are timed alike), its own
``--work`` folder (``job-0``, ``job-1``, … under ``--work``: no two processes write one file) and the
same settings; when-to-stop and the previews check go to the job with the least work. The jobs'
reports are merged as ``--from-results`` merges them, and the merged report is written and printed as
one run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import quality  # benchmarks/quality.py

HERE = Path(__file__).resolve().parent


@dataclass
class Job:
    """One worker's share: its tasks (in the benchmark's order) and the extra checks it runs."""

    tasks: list = field(default_factory=list)
    stop: bool = False
    previews: bool = False
    cost: float = 0.0

    def describe(self) -> str:
        extras = [name for name, on in (("when to stop", self.stop), ("previews", self.previews)) if on]
        return ", ".join([t.name for t in self.tasks] + extras)


def task_cost(task, s, reference: bool) -> float:
    """Training steps a task costs in all its seeds (a prior-preservation step trains twice the images;
    the script's run of a task with a reference costs about as much again). An estimate for balancing."""
    cost = s.steps(task) * len(s.seeds) * (2 if task.prior else 1)
    return cost * (2 if reference and task.reference else 1)


def plan_jobs(tasks, jobs: int, s, *, stop: bool, previews: bool, reference: bool) -> list[Job]:
    """``tasks`` split into at most ``jobs`` shares of about equal cost (largest task first onto the
    lightest share), when-to-stop and the previews check onto the lightest share after that."""
    plan = [Job() for _ in range(min(jobs, len(tasks)))]
    for task in sorted(tasks, key=lambda t: -task_cost(t, s, reference)):
        job = min(plan, key=lambda j: j.cost)
        job.tasks.append(task)
        job.cost += task_cost(task, s, reference)
    subject = next(t for t in quality.TASKS if t.name == "subject-lora-prior")
    extras = [("stop", 2 * 2 * s.steps(subject))] if stop else []
    extras += [("previews", 2 * 8)] if previews else []
    for name, cost in extras:
        job = min(plan, key=lambda j: j.cost)
        setattr(job, name, True)
        job.cost += cost
    order = {t.name: i for i, t in enumerate(quality.TASKS)}
    for job in plan:
        job.tasks.sort(key=lambda t: order[t.name])
    return plan


def job_argv(args, s, job: Job, work: Path) -> list[str]:
    """``quality.py``'s arguments for one job: the run's own settings, the job's tasks and folder."""
    argv = ["--model", s.model, "--seeds", ",".join(map(str, s.seeds)), "--tasks", ",".join(t.name for t in job.tasks),
            "--steps-scale", repr(s.steps_scale), "--class-images", str(s.num_class_images), "--work", str(work),
            "--threads", str(args.threads), "--precision", s.precision, "--worker"]
    argv += ["--quick"] if s.quick else []
    argv += [] if s.cache_text else ["--no-text-cache"]
    argv += ["--instance-prompt"] if s.instance_prompt else []
    argv += [] if s.prior_from_captions else ["--prior-class-prompt"]
    argv += ["--diffusers-examples", str(args.diffusers_examples)] if args.diffusers_examples else []
    argv += ["--budget-minutes", repr(args.budget_minutes)] if args.budget_minutes is not None else []
    for override in s.overrides:
        argv += ["--set", override]
    argv += [] if job.stop else ["--no-stop"]
    argv += [] if job.previews else ["--no-previews"]
    return argv


def oversubscribed(jobs: int, threads: int, cores: int) -> str | None:
    """A warning when the jobs' threads outnumber the cores: torch's OpenMP threads that wait for a core
    spin, and every job runs many times slower (seen here: two 2-thread trainings on 2 cores, 20×)."""
    if jobs * threads <= cores:
        return None
    return (f"quality: warning: {jobs} jobs × {threads} torch threads on {cores} cores: threads that wait for a "
            "core spin and every job runs many times slower; use --threads 1 or fewer --jobs")


def _forward(stream, prefix: str, log) -> None:
    for line in stream:
        log(f"{prefix}{line.rstrip()}")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_jobs(procs, grace: float = 30.0) -> None:
    """SIGINT to every job still running (quality.py stops after the current step and saves its rows);
    SIGTERM to any still running ``grace`` seconds later (a SIGINT that lands inside an import is
    swallowed by Python: seen here), then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        live = [p for p in procs if p.poll() is None]
        for proc in live:
            proc.send_signal(sig)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in live) and time.monotonic() < deadline:
            time.sleep(0.2)


def run_jobs(s, args, tasks, examples, command: str) -> dict | int:
    """Run the jobs side by side and merge their reports; an exit code if a job failed or was stopped."""
    log = s.log
    plan = plan_jobs(tasks, args.jobs, s, stop=not args.no_stop, previews=not args.no_previews,
                     reference=examples is not None)
    s.work.mkdir(parents=True, exist_ok=True)
    (s.work / "results.json").unlink(missing_ok=True)  # written once every job has finished
    log(f"quality: {len(plan)} jobs side by side, {args.threads} torch thread(s) each "
        f"(their logs: {s.work}/job-N.log)")
    if warning := oversubscribed(len(plan), args.threads, os.cpu_count() or 1):
        log(warning)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    procs, forwarders, folders = [], [], []
    for k, job in enumerate(plan):
        folder = s.work / f"job-{k}"
        folders.append(folder)
        log(f"  job {k}: {job.describe()}")
        errors = open(s.work / f"job-{k}.log", "w")  # noqa: SIM115 (open while the child runs)
        # its own session: a Ctrl-C reaches this process only, which passes it on once (a second SIGINT
        # would abort a job's training without its checkpoint)
        proc = subprocess.Popen([sys.executable, str(HERE / "quality.py"), *job_argv(args, s, job, folder)],
                                stdout=subprocess.PIPE, stderr=errors, text=True, env=env, start_new_session=True)
        errors.close()  # the child has its own copy of the descriptor
        procs.append(proc)
        forwarder = threading.Thread(target=_forward, args=(proc.stdout, f"[job {k}] ", log), daemon=True)
        forwarder.start()
        forwarders.append(forwarder)
    stopped = False
    term_before = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for proc in procs:
            proc.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every job stops after its step, keeping what it measured
        stopped = True
        stop_jobs(procs)
    finally:
        signal.signal(signal.SIGTERM, term_before)
    codes = [proc.wait() for proc in procs]
    for forwarder in forwarders:
        forwarder.join()
    seconds = time.perf_counter() - started
    results = [folder / "results.json" for folder in folders]
    if stopped or any(code != 0 for code in codes):
        ended = [f"job {k} (exit {code}, log {s.work}/job-{k}.log)" for k, code in enumerate(codes) if code != 0]
        kept = " ".join(str(p) for p in results if p.is_file())
        log(f"quality: {'stopped' if stopped else 'a job failed'}: {', '.join(ended) or 'every job had finished'}; "
            "no report was written."
            + (f" What the jobs measured: python benchmarks/quality.py --from-results {kept}" if kept else ""))
        return 130 if stopped else 1
    reports = [json.loads(p.read_text()) for p in results]
    report = quality.merge_reports(reports)
    skipped = sorted({seed for r in reports for seed in r.get("skipped_seeds", [])})
    if skipped:  # --budget-minutes: a job that left seeds out says so in the merged report too
        report["skipped_seeds"] = skipped
    report.update(command=command, seconds=seconds, jobs=len(plan),
                  job_plan=[{"tasks": [t.name for t in j.tasks], "stop": j.stop, "previews": j.previews,
                             "seconds": part["seconds"]}
                            for j, part in zip(plan, report.pop("parts", [{"seconds": seconds}]), strict=True)])
    report["seeds_asked"] = list(s.seeds)
    return report
