"""benchmarks/quality.py: ``--quick`` runs every task on the embedded base and the judge scores it
(no quality asserted); the when-to-stop bookkeeping; previews equal real use, pixel for pixel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import quality  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run of every task, the when-to-stop run and the previews check."""
    work = tmp_path_factory.mktemp("quality")
    lines: list[str] = []
    # as two jobs side by side (child processes, 1 thread each): proves --jobs and the merge end to end
    assert quality.main(["--quick", "--seeds", "0", "--jobs", "2", "--work", str(work),
                         "--doc", str(work / "quality.md")],
                        log=lines.append) == 0
    return work, json.loads((work / "results.json").read_text()), "\n".join(lines)


@pytest.mark.slow
def test_quick_run_scores_every_task_for_base_and_difftune(quick):
    work, report, printed = quick
    rows = report["rows"]
    for task in quality.TASKS:
        for tool in ("base", "difftune"):
            found = [r for r in rows if r["task"] == task.name and r["tool"] == tool]
            assert len(found) == 1, (task.name, tool)
            scores = found[0]["scores"]
            assert 0.0 <= scores["concept"] <= 1.0 and 0.0 <= scores["others"] <= 1.0
            if task.kind == "subject":
                assert {"prior_kept", "drift", "diversity"} <= set(scores)
        assert Path(report["grids"][task.name]).is_file()
        (trained,) = work.glob(f"job-*/runs/{task.name}-difftune-0")  # in the folder of the job that ran it
        assert (trained / "README.md").is_file()  # the run finished and exported
        assert f"`{task.name}`" in printed  # a table per task
    doc = (work / "quality.md").read_text()
    assert all(f"`{t.name}`" in doc for t in quality.TASKS) and "## When to stop" in doc
    assert report["jobs"] == 2 and report["threads"] == 1 and "2 processes side by side" in doc
    assert f"- Date: {report['finished']} UTC (the run finished)" in doc
    planned = [name for job in report["job_plan"] for name in job["tasks"]]
    assert sorted(planned) == sorted(quality.TASK_NAMES)  # every task in exactly one job
    assert "[job 0]" in printed and "[job 1]" in printed  # each job's progress reaches the caller's log


@pytest.mark.slow
def test_quick_when_to_stop_reads_losses_previews_and_best_checkpoint(quick):
    _work, report, _printed = quick
    stop = report["when_to_stop"]
    assert [c["step"] for c in stop["curve"]] == [2, 4]
    # the run sets validation.holdout_word: the checkpoint difftune marks best is the highest word gain
    # among its checkpoints (every evaluated step is checkpointed here, the last step too)
    assert all(isinstance(c["word_gain"], float) for c in stop["curve"])
    best = max(stop["curve"], key=lambda c: c["word_gain"])["step"]
    assert stop["best_checkpoint_step"] == stop["highest_gain_step"] == best
    assert stop["lowest_loss_step"] == min(stop["curve"], key=lambda c: c["val_loss"])["step"]
    assert stop["judge_best_step"] in (2, 4)


@pytest.mark.slow
def test_previews_equal_generate_and_plain_diffusers_pixel_for_pixel(quick):
    _work, report, _printed = quick
    by_precision = {p["precision"]: p for p in report["previews"]}
    # fp32 training: the preview is what the user gets, bit for bit. (bf16 training samples its previews
    # with bf16 weights under autocast, real use in fp32: the full run reports that difference.)
    assert set(by_precision) == {"no"}
    full = by_precision["no"]
    assert full["generate_max_diff"] == 0 and full["plain_max_diff"] == 0, full


def test_judge_best_prefers_fidelity_within_the_drift_limit_then_the_earliest_step():
    curve = [{"step": 10, "val_loss": 0.30, "fidelity": 0.2, "drift": 0.0},
             {"step": 20, "val_loss": 0.25, "fidelity": 0.8, "drift": 0.1},
             {"step": 30, "val_loss": 0.24, "fidelity": 0.8, "drift": 0.2},
             {"step": 40, "val_loss": 0.26, "fidelity": 1.0, "drift": 0.6}]
    assert quality.judge_best(curve)["step"] == 20
    assert quality.judge_best(curve, drift_limit=1.0)["step"] == 40


def test_early_stopping_follows_difftunes_patience_bookkeeping():
    losses = [0.30, 0.25, 0.26, 0.27, 0.24, 0.28, 0.29, 0.31]
    curve = [{"step": 10 * (i + 1), "val_loss": v} for i, v in enumerate(losses)]
    assert quality.early_stopping(curve, patience=2) == (40, 20)  # no improvement at 30 and 40
    assert quality.early_stopping(curve, patience=3) == (80, 50)  # 50 improves; 60, 70 and 80 do not
    assert quality.early_stopping(curve, patience=4) == (None, 50)
    # with the word gain (higher is better) it follows the gain, whatever the loss does
    gains = [0.01, 0.02, 0.04, 0.03, 0.05, 0.045, 0.04, 0.06]
    curve = [{**c, "word_gain": g} for c, g in zip(curve, gains, strict=True)]
    assert quality.early_stopping(curve, patience=2) == (70, 50)  # 50 is the best; 60 and 70 are not
    assert quality.early_stopping(curve, patience=4) == (None, 80)  # never stops: the whole curve's best


def test_summary_reads_the_best_checkpoint_that_the_run_marked(tmp_path):
    (tmp_path / "best.json").write_text(json.dumps({"checkpoint": "checkpoint-20", "step": 20, "val_loss": 0.25}))
    curve = [{"step": 10, "val_loss": 0.30, "fidelity": 0.1, "drift": 0.0},
             {"step": 20, "val_loss": 0.25, "fidelity": 0.9, "drift": 0.0}]
    summary = quality.summarise_stop(curve, tmp_path, patience=2)
    assert summary["best_checkpoint_step"] == 20 and summary["judge_best_step"] == 20
    assert summary["marked_scores"]["fidelity"] == 0.9
    # a best.json that is not a record (cut short, hand-edited) is not believed: the marked step falls back
    # to what difftune would mark from the curve (the lowest held-out loss)
    (tmp_path / "best.json").write_text('{"checkpoint": "checkpoint-10", "step": "ten"')
    curve[0]["val_loss"] = 0.20
    summary = quality.summarise_stop(curve, tmp_path, patience=2)
    assert summary["best_checkpoint_step"] is None and summary["marked_step"] == 10


def test_an_interrupted_or_short_run_is_never_scored(tmp_path):
    from difftune.training.state import RunResult

    done = RunResult(tmp_path, [], steps=10)
    assert quality.finished(done, 10, tmp_path) is done
    assert quality.finished(RunResult(tmp_path, [], steps=6, stopped_early=True), 10, tmp_path)
    with pytest.raises(quality.Interrupted, match="interrupted after step 6 of 10"):
        quality.finished(RunResult(tmp_path, [], steps=6, interrupted=15), 10, tmp_path)
    with pytest.raises(quality.Interrupted, match="ended at step 6 of 10"):
        quality.finished(RunResult(tmp_path, [], steps=6), 10, tmp_path)


def test_reports_of_runs_made_side_by_side_merge_in_task_order():
    a = {"rows": [{"task": "colour-ti", "tool": "difftune", "seed": 0, "scores": {}}], "seconds": 60.0,
         "command": "a", "grids": {"colour-ti": "a.png"}, "steps": {"colour-ti": 3}, "model": "m"}
    b = {"rows": [{"task": "style-lora", "tool": "base", "seed": None, "scores": {}},
                  {"task": "style-lora", "tool": "difftune", "seed": 1, "scores": {}},
                  {"task": "colour-ti", "tool": "difftune", "seed": 0, "scores": {"concept": 1.0}}],
         "seconds": 120.0, "command": "b", "when_to_stop": {"curve": []}, "model": "m"}
    merged = quality.merge_reports([a, b])
    assert merged["tasks"] == ["style-lora", "colour-ti"] and merged["seeds"] == [0, 1]
    assert len(merged["rows"]) == 3 and merged["rows"][0]["scores"] == {}  # the first report's row is kept
    assert merged["seconds"] == 120.0 and [p["command"] for p in merged["parts"]] == ["a", "b"]
    assert merged["when_to_stop"] == {"curve": []} and merged["grids"] == {"colour-ti": "a.png"}
    assert "finished" not in merged  # b's date is unknown: no date is made up for the merged runs
    a["finished"], b["finished"] = "2026-01-01 11:00", "2026-01-01 10:00"
    assert quality.merge_reports([a, b])["finished"] == "2026-01-01 11:00"  # the last to finish
    a["class_images"] = "captions"  # b predates the field: its class images came from the class prompt
    with pytest.raises(SystemExit, match="drew difftune's class images differently"):
        quality.merge_reports([a, b])


def test_the_doc_gives_the_date_the_run_finished_not_the_day_it_was_written(tmp_path):
    """A page written again from results (--from-results) keeps the run's date; results from before runs
    kept their date say so instead of passing the writing date off as the run's."""
    import quality_doc

    report = {"rows": [{"task": "colour-ti", "tool": "difftune", "seed": 0,
                        "scores": {"concept": 0.5, "others": 1.0, "train_seconds": 3.0}}],
              "seconds": 60.0, "command": "a", "grids": {}, "steps": {"colour-ti": 3}, "model": "m", "seeds": [0],
              "tasks": ["colour-ti"], "finished": "2025-03-04 05:06"}
    doc = quality_doc.write_doc(report, tmp_path / "q.md").read_text()
    assert "- Date: 2025-03-04 05:06 UTC (the run finished)" in doc
    assert "draw their class images from \"a diamond\"" in doc  # results from before the choice
    report["class_images"] = "captions"
    doc = quality_doc.write_doc(report, tmp_path / "q.md").read_text()
    assert "difftune draws its class images from each subject caption" in doc
    del report["finished"]
    doc = quality_doc.write_doc(report, tmp_path / "q.md").read_text()
    assert "- Date: not in the results" in doc and "2025-03-04" not in doc


def test_subject_tasks_put_the_class_noun_in_captions_prompts_class_prompt_and_the_reference(tmp_path):
    """The DreamBooth paper's setting ("a sks diamond", class prompt "a diamond"): every caption and
    prompt names the noun, prior preservation uses the noun's own class images, drift is measured on
    that noun, and diffusers' script gets the same instance and class prompts."""
    from reference import reference_args

    subjects = [t for t in quality.TASKS if t.kind == "subject"]
    assert {t.name for t in subjects} == {"subject-lora", "subject-lora-prior", "subject-full-prior"}
    noun = next(t for t in subjects if t.name == "subject-lora-prior")
    for task in subjects:
        assert all(" sks diamond" in text for _scene, text in task.items())
        assert all("sks diamond" in p.text and p.expected["shape"] == "star" for p in quality.prompts_for(task))
    assert all(" sks diamond" in text for _scene, text in quality.subject_holdout_items())
    drift = quality.class_prompts(noun.noun)
    assert drift[0].text == "a diamond" and {p.expected["shape"] for p in drift} == {"diamond"}

    s = quality.Settings(work=tmp_path, quick=True, prior_from_captions=False)
    config = quality.task_config(noun, s, 0, tmp_path / "data", tmp_path / "out")
    # difftune trains on the captions; --instance-prompt gives it the one prompt diffusers' script gets (below)
    assert "instance_prompt" not in config["data"]
    one = quality.task_config(noun, quality.Settings(work=tmp_path, quick=True, instance_prompt=True), 0, tmp_path,
                              tmp_path)["data"]
    assert (one["instance_prompt"], one["caption_source"]) == ("a sks diamond", "instance_prompt")
    prior = config["prior_preservation"]
    assert prior["class_prompt"] == "a diamond"
    assert Path(prior["class_data"]) == tmp_path / "class-images-diamond"
    # by default difftune's class images come from each caption without the trigger, in a folder of their own
    captions = quality.task_config(noun, quality.Settings(work=tmp_path, quick=True), 0, tmp_path,
                                   tmp_path)["prior_preservation"]
    assert captions["instance_word"] == "sks" and "class_prompt" not in captions
    assert Path(captions["class_data"]) == tmp_path / "class-images-diamond-captions"
    style = next(t for t in quality.TASKS if t.name == "style-lora")
    assert config["data"]["cache_dir"] != quality.task_config(style, s, 0, tmp_path, tmp_path)["data"]["cache_dir"]

    for folder in (tmp_path / "data", tmp_path / "class-images-diamond"):
        folder.mkdir()
        (folder / "a.png").write_bytes(b"")
    args = reference_args(noun, s, 0, tmp_path / "data", tmp_path / "ref", tmp_path)
    assert args[args.index("--instance_prompt") + 1] == "a sks diamond"
    assert args[args.index("--class_prompt") + 1] == "a diamond"
    assert Path(args[args.index("--class_data_dir") + 1]).name == "ref-class"


def test_the_script_gets_class_images_of_its_class_prompt_when_difftune_draws_from_the_captions(tmp_path):
    """difftune's class images come from the captions (their own folder); diffusers' script trains on the
    base's images of "a diamond", drawn into the class-prompt folder before its run, once."""
    from difftune.data.prior import class_images, recorded_prompts

    task = next(t for t in quality.TASKS if t.name == "subject-lora-prior")
    s = quality.Settings(work=tmp_path, quick=True, precision="no", log=lambda _m: None)
    folder = quality.class_prompt_images(task, s, 0)
    assert folder == task.class_folder(tmp_path) and len(class_images(folder)) == s.class_count() == 1
    assert set(recorded_prompts(folder).values()) == {"a diamond"}
    stamp = class_images(folder)[0].stat().st_mtime_ns
    quality.class_prompt_images(task, s, 1)  # already there: not drawn again
    assert class_images(folder)[0].stat().st_mtime_ns == stamp and len(class_images(folder)) == 1


@pytest.mark.parametrize("native", [True, False])
def test_difftune_and_the_scripts_train_in_the_precision_auto_picks_for_the_model_here(tmp_path, monkeypatch, native):
    """--precision auto, as train.mixed_precision = "auto" picks for the model on this machine: fp32 for the
    small embedded base even where the CPU runs bf16 natively (bf16 is the slower there), bf16 for a model
    large enough to gain from it, fp32 where torch would emulate bf16 (tens of times slower); difftune's
    config and the script's --mixed_precision get the same; reports of different precisions are not merged
    into one table."""
    from reference import reference_args

    from difftune.training import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    style = next(t for t in quality.TASKS if t.name == "style-lora")
    assert quality.Settings(work=tmp_path, quick=True).precision == "no"  # the embedded base: fp32 either way
    monkeypatch.setattr(precision, "BF16_MIN_CPU_WORK", 1.0)  # as if it were a large model
    s = quality.Settings(work=tmp_path, quick=True)
    expected = "bf16" if native else "no"
    assert s.precision == expected
    assert quality.task_config(style, s, 0, tmp_path, tmp_path)["train"]["mixed_precision"] == expected
    args = reference_args(style, s, 0, tmp_path, tmp_path / "ref", tmp_path)
    assert args[args.index("--mixed_precision") + 1] == expected
    assert quality.Settings(work=tmp_path, precision="bf16").precision == "bf16"  # asked for: kept
    rows = [{"task": "style-lora", "tool": "difftune", "seed": 0, "scores": {}}]
    reports = [{"rows": rows, "seconds": 1.0, "precision": p, "model": "m"} for p in ("no", "bf16")]
    with pytest.raises(SystemExit, match="different precisions"):
        quality.merge_reports(reports)


def test_jobs_share_the_tasks_evenly_and_each_job_gets_the_runs_settings(tmp_path):
    import quality_jobs

    s = quality.Settings(work=tmp_path, overrides=("method.rank=4",), precision="no", cache_text=False,
                         prior_from_captions=False)
    tasks = list(quality.TASKS)
    plan = quality_jobs.plan_jobs(tasks, 2, s, stop=True, previews=True, reference=True)
    assert sorted(t.name for job in plan for t in job.tasks) == sorted(quality.TASK_NAMES)
    costs = [sum(quality_jobs.task_cost(t, s, True) for t in job.tasks) for job in plan]
    assert max(costs) - min(costs) <= max(quality_jobs.task_cost(t, s, True) for t in tasks)  # balanced
    assert [job.stop for job in plan].count(True) == 1 and [job.previews for job in plan].count(True) == 1
    # never more jobs than tasks; no job without a task
    lone = quality_jobs.plan_jobs(tasks[:1], 4, s, stop=True, previews=False, reference=False)
    assert len(lone) == 1 and lone[0].stop and not lone[0].previews

    class Args:
        threads, diffusers_examples, budget_minutes = 1, tmp_path / "diffusers", None

    job = next(j for j in plan if not j.stop)
    argv = quality_jobs.job_argv(Args, s, job, tmp_path / "job-0")
    said = dict(zip(argv[::2], argv[1::2], strict=False))
    assert said["--tasks"] == ",".join(t.name for t in job.tasks) and said["--work"] == str(tmp_path / "job-0")
    assert said["--precision"] == "no" and said["--threads"] == "1"
    assert {"--no-text-cache", "--no-stop", "--worker", "--prior-class-prompt"} <= set(argv)
    assert argv[argv.index("--set") + 1] == "method.rank=4"
    assert argv[argv.index("--diffusers-examples") + 1] == str(tmp_path / "diffusers")
    # more threads than cores is said at the start
    assert quality_jobs.oversubscribed(2, 1, 2) is None
    assert "2 jobs × 2 torch threads on 2 cores" in quality_jobs.oversubscribed(2, 2, 2)


def test_stopping_jobs_ends_even_one_that_ignores_sigint():
    import signal
    import subprocess
    import time

    import quality_jobs

    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)
    # (Python keeps SIGINT ignored when it starts ignored, as under a shell that ran the suite in the
    # background: CI. The polite job takes it as a terminal's Ctrl-C would reach it.)
    polite = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, "
                               "signal.default_int_handler); print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert stubborn.stdout.readline() == polite.stdout.readline() == "ready\n"
    started = time.monotonic()
    quality_jobs.stop_jobs([stubborn, polite], grace=1.0)
    assert polite.returncode == -signal.SIGINT  # ended by the first SIGINT (Python's KeyboardInterrupt)
    assert stubborn.returncode == -signal.SIGTERM  # after the grace period
    assert time.monotonic() - started < 10


def test_a_model_that_is_no_folder_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        quality.main(["--model", str(tmp_path / "nowhere"), "--tasks", "style-lora", "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()
    with pytest.raises(SystemExit) as exc:
        quality.main(["--jobs", "0", "--work", str(tmp_path / "w")])
    assert exc.value.code == 2 and "--jobs" in capsys.readouterr().err


def test_text_cache_is_on_where_the_method_allows_and_off_when_asked(tmp_path):
    style, subject = (next(t for t in quality.TASKS if t.name == n) for n in ("style-lora", "subject-lora"))
    cached = quality.Settings(work=tmp_path)
    assert quality.task_config(style, cached, 0, tmp_path, tmp_path)["data"]["cache_text"] is True
    assert "cache_text" not in quality.task_config(subject, cached, 0, tmp_path, tmp_path)["data"]  # trains the TE
    uncached = quality.Settings(work=tmp_path, cache_text=False)
    assert "cache_text" not in quality.task_config(style, uncached, 0, tmp_path, tmp_path)["data"]


def test_set_overrides_reach_every_difftune_run_and_bad_keys_are_refused(tmp_path, capsys):
    from difftune import load_config

    style = next(t for t in quality.TASKS if t.name == "style-lora")
    s = quality.Settings(work=tmp_path, overrides=("train.max_grad_norm=none", "method.rank=4"))
    raw = quality.task_config(style, s, 0, tmp_path, tmp_path / "out")
    assert raw["train"]["max_grad_norm"] == "none" and raw["method"]["rank"] == 4
    (tmp_path / "data").mkdir()
    raw["data"]["path"] = str(tmp_path / "data")
    config = load_config(data=raw, check_paths=False)
    assert config.train.max_grad_norm is None and config.method.rank == 4  # "none" unsets, as on the CLI
    for bad, said in (("train.max_grad_nrom=1", "train.max_grad_nrom"), ("nokeyvalue", "KEY=VALUE")):
        with pytest.raises(SystemExit) as exc:
            quality.main(["--set", bad, "--tasks", "style-lora", "--work", str(tmp_path / "w")])
        assert exc.value.code == 2 and said in capsys.readouterr().err
    # a valid key that makes a task's config invalid (a trained text encoder beside the style task's text cache)
    with pytest.raises(SystemExit) as exc:
        quality.main(["--set", "method.train_text_encoder=true", "--tasks", "style-lora", "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "style-lora" in err and "data.cache_text" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()  # refused before anything ran


def test_goals_table_checks_the_figures_and_the_reference_within_the_seed_spread():
    def row(task, tool, seed, **scores):
        return {"task": task, "tool": tool, "seed": seed, "scores": scores}

    rows = [row("style-lora", "difftune", s, concept=c, others=o, train_seconds=60.0)
            for s, c, o in ((0, 0.8, 0.90), (1, 0.7, 0.80), (2, 0.75, 0.85))]
    rows += [row("style-lora", "reference", s, concept=c, others=0.99, train_seconds=100.0)
             for s, c in ((0, 0.70), (1, 0.80), (2, 0.75))]
    rows += [row("style-dora", "difftune", s, concept=0.5, others=0.9, train_seconds=50.0) for s in (0, 1)]
    table = quality.goals({"rows": rows, "tasks": ["style-lora", "style-dora"]})
    lora, dora = (line for line in table.splitlines() if line.startswith("| style"))
    # concept 75 % meets 70 %; others 85 % meets 85 %; the concept ties the script; others are 14 points
    # behind with a spread of 5 + 0: reported, with both figures; 60 s against 100 s is faster
    assert lora.split(" | ")[1:3] == ["met (75%)", "met (85%)"]
    assert "**no** — other attributes right: 85% vs 99%" in lora and "concept" not in lora.split("**no**")[1]
    assert lora.rstrip(" |").endswith("yes (60 s vs 100 s)")
    assert dora.split(" | ")[1] == "**not met** (50%)" and "— (no script)" in dora


def test_every_subject_task_trains_the_text_encoder_and_its_config_loads(tmp_path):
    # UNet-only, the full fine-tune + prior drew the star on 58 % with half the diamonds drifting (docs/quality.md)
    from difftune import load_config

    s = quality.Settings(work=tmp_path)
    (tmp_path / "data").mkdir()
    for task in (t for t in quality.TASKS if t.kind == "subject"):
        task.class_folder(tmp_path).mkdir(exist_ok=True)
        raw = quality.task_config(task, s, 0, tmp_path / "data", tmp_path / task.name)
        assert raw["method"]["train_text_encoder"] is True and "cache_text" not in raw["data"], task.name
        assert load_config(data=raw).method.train_text_encoder, task.name  # accepted as set, not refused
