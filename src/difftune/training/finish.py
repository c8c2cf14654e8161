"""The end of a run: last samples, the agreement check between processes, the report, the result files."""

from __future__ import annotations

import json
from pathlib import Path

from difftune.models.base import Components
from difftune.publish.model_card import write_model_card
from difftune.training.accelerator import check_replicas_agree
from difftune.training.checkpointing import refuse_non_finite
from difftune.training.distributed import gathered
from difftune.training.holdout import LOSS
from difftune.training.precision import autocast_dtype, precision_label
from difftune.training.state import Run, RunResult
from difftune.training.validation import run_validation
from difftune.version import __version__


def finish(run: Run) -> RunResult:
    """Close the run: an interrupted run only ends its trackers; a finished one exports its result."""
    run.progress.close()
    result = run.result
    result.skipped_steps = run.guard.skipped
    result.steps = run.step  # where it ended: the last step, or where a signal or early stopping stopped it
    if result.interrupted:
        run.live.finish("stopped")
        run.accelerator.end_training()
        if run.folder is not None:
            if run.step == 0 and run.is_main:  # stopped before its first step: leave the folder as it was
                run.folder.discard_new_files()
            run.folder.release()
        return result
    validation = run.config.validation
    if run.samples and not (validation.every and run.step % validation.every == 0):
        validate(run)
    run.accelerator.wait_for_everyone()
    if run.world > 1 and not run.model.strategy.shards:  # FSDP: each process holds its own shard
        check_replicas_agree(run.accelerator, run.model.params, run.say)
    result.performance = run.monitor.summary(run.model.components, run.model.params, run.optimizer)
    run.accelerator.log({"perf/median_step_seconds": result.performance["median_step_seconds"],
                         "perf/peak_memory_gib": result.performance["peak_memory_bytes"] / 2**30}, step=run.step)
    if run.is_main:
        run.say(f"performance: {run.monitor.describe(result.performance)}")
        run.monitor.write(run.paths.logs, result.performance)
    with run.evaluating(encoders=False, purpose="export"):  # every process: all check the weights; FSDP gathers
        refuse_non_finite(run, "nothing was exported")
        trained = gathered_for_export(run)
        if run.is_main:
            result.files = run.model.method.export(trained, run.paths.root, adapter_metadata(run))
    if run.is_main:
        write_card(run)
        if run.folder is not None:
            run.folder.mark_finished([*result.files, run.paths.root / "README.md"])
        what = "pipeline" if run.model.method.exports_frozen_modules else "adapter"  # full: the whole model
        run.say(f"done: {run.step} steps; {what} in {run.paths.root}")
        run.live.finish("done")
    run.accelerator.wait_for_everyone()  # every process ends together, with no collective in flight
    run.accelerator.end_training()
    if run.folder is not None:
        run.folder.release()
    return result


def gathered_for_export(run: Run) -> Components:
    """What the export writes: the model as it trained, or (FSDP) with the trained modules' full weights
    (and, for a whole pipeline, the sharded frozen modules') gathered on the main process (every process
    takes part)."""
    model = run.model
    if not model.strategy.shards:
        return model.components
    modules = dict(model.wrapped)
    if model.method.exports_frozen_modules:  # and the frozen modules sharded because they run every step
        parts = model.components.by_role()
        modules.update({role: parts[role] for role in model.skeletons if role not in modules})
    return model.components.with_modules(gathered(modules, model.skeletons, run.is_main))


def validate(run: Run) -> None:
    """Sample the validation prompts with the current weights into ``samples/step-N`` (the main process
    writes and logs them). FSDP: every process samples the same images from the sharded modules (each
    forward of a sharded module needs every process; see docs/scaling.md), and only the main process keeps them."""
    sharded = run.model.strategy.shards
    if run.is_main or sharded:
        model, config = run.model, run.config
        trained = {name: run.accelerator.unwrap_model(m) for name, m in model.wrapped.items()}
        view = model.components.with_modules(trained)
        with run.evaluating():
            saved = run_validation(
                model.family, model.components, view.denoiser, view.text_encoders, run.samples, run.device,
                autocast_dtype(config), run.paths.samples, run.step, run.accelerator.trackers,
                extra={k: v for k, v in model.objective.sampling.items() if k != "scheduler"}, write=run.is_main,
            )
        if run.is_main:
            run.result.samples = saved
    run.accelerator.wait_for_everyone()


def adapter_metadata(run: Run) -> dict[str, str]:
    """What the result files carry in their headers about the run."""
    config, model = run.config, run.model
    sampling = {"difftune.sampling": json.dumps(model.objective.sampling)} if model.objective.sampling else {}
    return {
        **sampling,  # how to sample the result (zero terminal SNR): difftune generate applies it
        "difftune.version": __version__,
        "difftune.base_model": config.model.path,
        "difftune.family": model.family.name,
        "difftune.method": model.method.name,
        "difftune.denoiser_config_sha256": model.family.denoiser_config_hash(model.components),
        "difftune.steps": str(run.step),
        "difftune.trigger": config.data.instance_prompt or "",
    }


def training_facts(run: Run) -> dict[str, object]:
    """The model card's training table: schedule, optimizer, batch, data, precision, speed, held-out loss."""
    config, result, t = run.config, run.result, run.config.train
    facts: dict[str, object] = {
        "Steps": run.step,
        "Learning rate": f"{rate_history(run.lr_segments or [[0, run.lr]])} ({t.lr_scheduler}, "
                         f"{t.warmup_steps} warm-up steps)",
        "Optimizer": f"{t.optimizer} (β1 {t.adam_beta1}, β2 {t.adam_beta2}, weight decay {t.weight_decay})",
        "Batch": f"{t.batch_size} × {t.gradient_accumulation} accumulation × {run.world} process(es)",
        "Resolution": config.data.resolution,
        "Dataset": run.data.card_entry(),
        "Mixed precision": precision_label(config),
        "Min-SNR γ": t.snr_gamma if t.snr_gamma is not None else "off",
        "Noise offset": t.noise_offset,
        "Seed": t.seed,
    }
    if result.performance:
        perf = result.performance
        facts["Speed"] = f"{perf['median_step_seconds']:.3f} s per step (median, {perf['steps']} steps)"
        facts["Peak memory"] = f"{perf['peak_memory_bytes'] / 2**30:.2f} GiB ({perf['peak_memory_kind']})"
    keeper = run.held_out.keeper if run.held_out else None
    if keeper and keeper.history:  # the best carries over a resume (best.json); the history is this segment's
        end, best = keeper.history[-1], keeper.best
        marked = f" at step {best.step}" + (" (stopped early)" if result.stopped_early else "") if best else ""
        facts["Held-out loss"] = f"{end.loss:.5f} at the end" + (
            f", lowest {best.loss:.5f}{marked}" if best and keeper.by == LOSS else "")
        if end.gain is not None:
            facts[f"Held-out word gain (`{config.validation.holdout_word.strip()}`)"] = (
                f"{end.gain:+.5f} at the end" + (f", best {best.gain:+.5f}{marked}" if best else ""))
    pp = config.prior_preservation
    if pp.enabled:
        drawn = f"`{pp.class_prompt}`" if pp.class_prompt else f"the captions without `{pp.instance_word}`"
        facts["Prior preservation"] = f"{drawn}, {pp.num_class_images} class images, weight {pp.loss_weight}"
    return facts


def rate_history(segments: list[list[float]]) -> str:
    """``0.004 from step 200 (before: 0.001 from step 0)``: the learning rates a resumed run trained with."""
    (last_step, last), earlier = segments[-1], segments[:-1]
    if not earlier:
        return f"{last:g}"
    before = ", ".join(f"{rate:g} from step {step}" for step, rate in earlier)
    return f"{last:g} from step {last_step} (before: {before})"


def write_card(run: Run) -> None:
    """``README.md``: the model card (Hugging Face convention) of the finished run."""
    config, method = run.config, run.model.method
    details = method.card_details()
    samples = []
    for p in run.result.samples:
        if p.name != "grid.png":
            prompt_index = int(p.name.split("-", 1)[0])
            samples.append((run.samples[prompt_index].prompt, p.relative_to(run.paths.root).as_posix()))
    prompt = config.data.instance_prompt or (run.samples[0].prompt if run.samples else "a photo")
    usage = details.get("usage", "").format(base_model=config.model.path, repo_or_folder=str(run.paths.root),
                                            prompt=prompt)
    write_model_card(
        run.paths.root / "README.md",
        base_model=config.model.path,
        family_title=run.model.family.title,
        tags=["text-to-image", "diffusers", "difftune", *details.get("tags", []), *run.model.family.card_tags],
        license=config.output.license,
        instance_prompt=config.data.instance_prompt,
        summary=details.get("summary", {}),
        training=training_facts(run),
        samples=samples,
        usage=usage,
        options=(run.paths.logs / "options.txt").read_text(encoding="utf-8") if (run.paths.logs / "options.txt").is_file()
        else "",
        tool_usage=details.get("tool_usage", "").replace("{prompt}", prompt),
        title=f"{details.get('summary', {}).get('Method', method.name)} for "
              f"{Path(config.model.path).name or config.model.path}",
    )
