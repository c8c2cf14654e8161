"""The training loop: one function that reads top to bottom.

Every family, objective and method is reached through its registry, so this file never
changes when one is added.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difftune.config.loader import config_to_dict, dump_toml
from difftune.config.schema import Config
from difftune.data.cache import frozen_encoders_on
from difftune.data.pipeline import build_training_data, release_if_cached
from difftune.errors import DifftuneError
from difftune.export.model_card import write_model_card
from difftune.fileio import atomic_write_text
from difftune.methods import METHODS
from difftune.objectives import OBJECTIVES
from difftune.training import checkpoint as ckpt
from difftune.training import faults, holdout, performance, resume
from difftune.training.optim import build_optimizer, build_scheduler
from difftune.training.precision import autocast_dtype, mixed_precision
from difftune.training.progress import RunProgress
from difftune.training.run import (
    RunPaths,
    RunResult,
    learning_rate,
    make_accelerator,
    step_seed,
    total_steps,
    tracker_hparams,
    with_modules,
)
from difftune.training.setup import load_model
from difftune.training.signals import StopRequest
from difftune.training.validation import run_validation
from difftune.version import __version__


def train(config: Config, log=print) -> RunResult:
    """Run a whole training job described by ``config`` and return what it produced.

    SIGINT (Ctrl-C) or SIGTERM stops it after the current step with a checkpoint
    (``RunResult.interrupted``); running out of GPU memory becomes a message saying what to change.
    """
    with faults.out_of_memory_advice(config), StopRequest(log) as stop:
        return _train(config, log, stop)


def _train(config: Config, log, stop: StopRequest) -> RunResult:
    paths = RunPaths(Path(config.output.dir))
    accelerator = make_accelerator(config, paths)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    if main:
        paths.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.root / "config.toml", dump_toml(config_to_dict(config)))

    # Model, method and objective, each through its registry.
    loaded = load_model(config, device, is_main=main, barrier=accelerator.wait_for_everyone, log=log)
    family, components, class_examples = loaded.family, loaded.components, loaded.class_examples
    method = METHODS.get(config.method.type).build(config.method, family)
    torch.manual_seed(config.train.seed)  # new weights (LoRA A matrices, ...) start from the seed too
    method.prepare(components)
    objective = OBJECTIVES.get(family.objective)(family.objective_settings(components), config.train)
    for module in (components.vae, *components.text_encoders, components.denoiser):
        module.to(device)
    trainable = method.trainable_modules(components)
    if config.train.gradient_checkpointing:
        for module in trainable.values():
            _enable_gradient_checkpointing(module)

    # Data: a deterministic, resumable order of micro-batches for this process (caches filled here).
    data = build_training_data(config, family, components, class_examples=class_examples, rank=rank, world=world,
                               is_main=main, barrier=accelerator.wait_for_everyone, log=log, progress=main)
    dataset, order = data.dataset, data.order
    fingerprint = resume.dataset_fingerprint(data.scan.examples)
    held_out = holdout.HeldOutLoss(data.held_out, config) if data.held_out else None
    release_if_cached(config, components)
    steps = total_steps(config, order.batches_per_epoch)

    # Optimizer and schedule; then restore a checkpoint if resuming.
    lr = learning_rate(config, world)
    optimizer = build_optimizer(method.param_groups(components, lr), config.train, device)
    scheduler = build_scheduler(optimizer, config.train, steps)
    step, state = 0, None
    resume_from = _resume_folder(config, paths, accelerator, log)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, rank)
        resume.check_compatible(state.extra["info"], config, fingerprint, world, log if main else _quiet)
        method.load_trainable_state_dict(components, state.trainable)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        step = state.step
        if main:
            log(f"resumed from {resume_from} at step {step}")
    guard = faults.NonFiniteGuard(config.train.max_nan_steps, state.extra["info"].get("skipped_steps", 0) if state else 0)

    wrapped_list = accelerator.prepare(*trainable.values(), optimizer)
    wrapped = dict(zip(trainable, wrapped_list[:-1], strict=True))
    optimizer = wrapped_list[-1]
    train_view = performance.apply(config, components, with_modules(components, wrapped), log if main else _quiet)
    trains_text = _trains_text(train_view)  # once, not per micro-batch
    params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]

    if state is not None:
        _restore_after_prepare(accelerator, state, rank, log)
    first_step, accumulation = step, config.train.gradient_accumulation
    order.start = resume.resume_micro_batch(state, accumulation) if state else 0
    live = RunProgress(paths.logs, steps, step, enabled=main)  # logs/progress.json, logs/metrics.jsonl

    def save(at_step: int, scheduler_state: dict | None = None, skipped: int | None = None) -> Path | None:
        micro = order.start + (at_step - first_step) * accumulation
        info = resume.checkpoint_info(config, fingerprint, len(data.scan.examples), order, micro, world,
                                      guard.skipped if skipped is None else skipped)
        return _save_checkpoint(accelerator, method, components, optimizer, scheduler_state or scheduler.state_dict(),
                                config, paths, at_step, log, held_out, info)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=order, collate_fn=data.collate, num_workers=config.data.num_workers,
        persistent_workers=config.data.num_workers > 0,
    )
    monitor = performance.RunMonitor(device, compiled=config.train.compile)
    batches = monitor.timed(iter(loader))

    if config.logging.report_to != "none":
        accelerator.init_trackers(
            config.logging.project, config=tracker_hparams(config),
            init_kwargs={"wandb": {"name": config.logging.run_name or paths.root.name}},
        )
    if main:
        log(
            f"training {family.title} with {method.name}: {len(dataset)} images, {steps} steps, "
            f"batch {config.train.batch_size}×{config.train.gradient_accumulation}×{world}, lr {lr:g}, "
            f"{sum(p.numel() for p in params):,} trainable parameters, device {device}, "
            f"mixed precision {mixed_precision(config)}"
        )

    result = RunResult(paths.root, [], steps)
    progress = tqdm(total=steps, initial=step, disable=not main, desc="train", unit="step", dynamic_ncols=True)
    running = torch.zeros((), device=device)
    running_count = 0
    for module in trainable.values():
        module.train()

    saved_step = step
    while step < steps:
        # Every random draw of this step comes from a seed derived from (seed, step, process).
        torch.manual_seed(step_seed(config.train.seed, step, rank))
        step_loss = torch.zeros((), device=device)
        for micro in range(accumulation):
            batch = method.prepare_batch(next(batches))
            last = micro == accumulation - 1
            sync = contextlib.nullcontext() if last or world == 1 else _no_sync(accelerator, wrapped.values())
            with sync:
                loss = _loss(family, train_view, objective, batch, device, config, trains_text)
                accelerator.backward(loss / accumulation)
            step_loss += loss.detach()
        grad_norm = None
        if config.train.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
        # The one device sync per step: is the step non-finite, and did anyone ask to stop?
        bad, stop_now = faults.agree(accelerator, faults.nonfinite(step_loss, grad_norm, accelerator.scaler),
                                     stop.requested)
        stepped = faults.optimizer_step(optimizer, bad, accelerator.scaler)
        guard.record(step, stepped, bad, scheduler)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if stepped:
            method.on_step_end(step, components)
        elif bad and main:
            log(f"step {step}: the loss is NaN or infinite; skipped it ({guard.in_row} in a row, "
                f"limit train.max_nan_steps = {guard.limit})")
        if not bad:
            running += step_loss
            running_count += accumulation
        progress.update(1)
        monitor.step_done()
        live.step_done(step)
        if guard.should_stop:
            folder = save(guard.first_bad_step, guard.scheduler_before_streak, guard.skipped_before_streak)
            progress.close()
            raise guard.error(folder)

        if step % config.train.log_every == 0 or step == steps:
            total = accelerator.reduce(running, reduction="mean")
            mean_loss = (total / running_count).item() if running_count else float("nan")
            running.zero_()
            running_count = 0
            current_lr = scheduler.get_last_lr()[0]
            result.losses.append((step, mean_loss))
            live.metrics(step, loss=mean_loss, lr=current_lr)
            accelerator.log({"train/loss": mean_loss, "train/lr": current_lr}, step=step)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{current_lr:.2e}", refresh=False)

        if config.validation.prompts and config.validation.every and step % config.validation.every == 0:
            result.samples = _validate(accelerator, family, components, wrapped, config, paths, step)
        if held_out and held_out.due(step, steps):
            _evaluate_held_out(accelerator, held_out, family, components, objective, method, config, step, result,
                               log)
            live.metrics(step, val_loss=result.val_losses[-1][1])
        if (config.train.checkpoint_every and step % config.train.checkpoint_every == 0 and step < steps
                and not guard.in_row):  # not while steps are being skipped: the last good state is older
            save(step)
            saved_step = step
        if stop_now and step < steps:
            folder = save(step) if saved_step != step else paths.checkpoints / f"{ckpt.PREFIX}{step}"
            result.interrupted, result.skipped_steps = stop.signum, guard.skipped
            if main:
                log(f"stopped by {stop.name} after step {step}; checkpoint {folder}. Resume with: "
                    f"difftune train {paths.root / 'config.toml'} --set train.resume=latest")
            break
        if held_out and held_out.should_stop:
            result.stopped_early = True
            if main:
                best = held_out.best_folder(paths.checkpoints)
                log(f"early stop at step {step}: no held-out improvement in {config.validation.patience} "
                    f"evaluations; best step {held_out.best[0]}" + (f" (checkpoint {best})" if best else ""))
            break
        monitor.restart_clock()  # validation, evaluation and checkpoints are not part of the step time
    progress.close()
    result.skipped_steps = guard.skipped
    if result.interrupted:
        live.finish("stopped")
        accelerator.end_training()
        return result

    if config.validation.prompts and not (config.validation.every and step % config.validation.every == 0):
        result.samples = _validate(accelerator, family, components, wrapped, config, paths, step)
    accelerator.wait_for_everyone()
    if world > 1:
        _check_replicas_agree(accelerator, params, log)
    result.performance = monitor.summary()
    accelerator.log({"perf/median_step_seconds": result.performance["median_step_seconds"],
                     "perf/peak_memory_gib": result.performance["peak_memory_bytes"] / 2**30}, step=step)
    if main:
        log(f"performance: {monitor.describe(result.performance)}")
        monitor.write(paths.logs, result.performance)
        metadata = _adapter_metadata(config, family, method, components, step)
        result.files = method.export(components, paths.root, metadata)
        _write_card(config, family, method, components, paths, step, data.card_entry(), world, lr, result)
        log(f"done: {step} steps; adapter in {paths.root}")
        live.finish("done")
    accelerator.wait_for_everyone()  # every process ends together, with no collective in flight
    accelerator.end_training()
    return result


def _quiet(_msg: str) -> None:
    pass


def _trains_text(components) -> bool:
    """True if any text-encoder weight trains (then prompt encoding keeps its graph)."""
    return any(p.requires_grad for encoder in components.text_encoders if encoder is not None
               for p in encoder.parameters())


def _loss(family, components, objective, batch, device, config: Config, trains_text: bool | None = None) -> torch.Tensor:
    """Mean loss of one micro-batch. ``trains_text`` is worked out from the encoders when not given."""
    if trains_text is None:
        trains_text = _trains_text(components)
    if "latent_mean" in batch:  # cached: sample from the stored distribution with this step's seed
        mean = batch["latent_mean"].to(device)
        latents = mean + batch["latent_std"].to(device) * torch.randn_like(mean)
    else:
        with torch.no_grad():
            latents = family.encode_images(components, batch["pixels"].to(device))
    if "conditioning" in batch:
        conditioning = {k: v.to(device) for k, v in batch["conditioning"].items()}
    else:
        with contextlib.nullcontext() if trains_text else torch.no_grad():
            conditioning = family.encode_prompt(components, batch["captions"])
    noised = objective.noise(latents.float())
    prediction = family.predict(
        components, components.denoiser, noised.noisy_latents, noised.timesteps, conditioning, batch
    )
    losses = objective.per_sample_loss(prediction, noised)
    if "loss_weights" in batch:  # per-image weights from the data, e.g. the prior-preservation weight
        losses = losses * batch["loss_weights"].to(losses.device)
    return losses.mean()


def _evaluate_held_out(accelerator, held_out, family, components, objective, method, config, step, result, log):
    # Every process evaluates the same images, so all agree on early stopping without communicating.
    with frozen_encoders_on(components, accelerator.device):
        loss = held_out.evaluate(family, components, objective, method, accelerator.device, autocast_dtype(config))
    improved = held_out.record(step, loss)
    result.val_losses.append((step, loss))
    accelerator.log({"val/loss": loss}, step=step)
    if accelerator.is_main_process:
        log(f"step {step}: held-out loss {loss:.5f}" + (" (best so far)" if improved else ""))


def _check_replicas_agree(accelerator, params, log) -> None:
    """Every process must end with the same weights; a mismatch means gradients were not synchronised."""
    flat = torch.cat([p.detach().double().flatten() for p in params])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    fingerprint = torch.stack([flat.sum(), (flat * weights).sum(), flat.abs().max()]).unsqueeze(0)
    everyone = accelerator.gather(fingerprint)
    # The gather's tensors are released by a gloo worker thread, which needs the GIL for that: wait
    # here (GIL released) until it has, or tearing the process group down at the end of the run
    # (its destructor joins the workers while holding the GIL) can deadlock.
    accelerator.wait_for_everyone()
    if not torch.equal(everyone, fingerprint.expand_as(everyone)):
        raise DifftuneError("the training processes ended with different weights; gradients were not synchronised")
    if accelerator.is_main_process:
        log(f"all {accelerator.num_processes} processes hold identical trainable weights")


def _no_sync(accelerator, modules):
    stack = contextlib.ExitStack()
    for module in modules:
        stack.enter_context(accelerator.no_sync(module))
    return stack


def _enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
    elif hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable()


def _quiet(_message: str) -> None:
    pass


def _resume_folder(config: Config, paths: RunPaths, accelerator, log) -> Path | None:
    resume = config.train.resume
    if not resume:
        return None
    main = accelerator.is_main_process
    if resume == "latest":
        if main:  # a kill during a save may have left a staging folder or a moved-aside checkpoint
            ckpt.repair(paths.checkpoints, log)
        accelerator.wait_for_everyone()
        folder = ckpt.find_resumable(paths.checkpoints, log if main else _quiet, repair_first=False)
        if folder is None and main:
            log(f"train.resume = \"latest\": no checkpoint in {paths.checkpoints}, starting from step 0")
        return folder
    folder = Path(resume).expanduser()
    problem = ckpt.verify(folder)
    if problem:
        raise DifftuneError(f"train.resume: {folder} cannot be used ({problem})")
    return folder


def _restore_after_prepare(accelerator, state, rank: int, log) -> None:
    """Gradient scaler (fp16) and this process's random state, once accelerate has set things up."""
    if accelerator.scaler is not None and state.extra.get("scaler"):
        accelerator.scaler.load_state_dict(state.extra["scaler"])
    resume.restore_rng(state, rank, log if accelerator.is_main_process else _quiet)


def _save_checkpoint(accelerator, method, components, optimizer, scheduler_state, config, paths, step, log,
                     held_out, info) -> Path | None:
    """Every process writes its random state into the staging folder, then the main process completes it."""
    root = paths.checkpoints
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.begin(root, step)
    accelerator.wait_for_everyone()
    ckpt.save_rng(ckpt.staging_folder(root, step), accelerator.process_index)
    accelerator.wait_for_everyone()
    folder = None
    if accelerator.is_main_process:
        raw_optimizer = getattr(optimizer, "optimizer", optimizer)
        scaler = accelerator.scaler
        state = ckpt.TrainingState(
            step=step,
            trainable=method.trainable_state_dict(components),
            optimizer=raw_optimizer.state_dict(),
            scheduler=scheduler_state,
            extra={"scaler": scaler.state_dict()} if scaler is not None else {},
        )
        info = {"difftune_version": __version__, **info}
        if held_out:
            info.update(held_out.checkpoint_info(step))
        folder = ckpt.finish(root, ckpt.staging_folder(root, step), state, info)
        if held_out:
            held_out.mark_checkpoint(root, folder, step, info)
        ckpt.prune(root, config.train.checkpoints_keep,
                   protect=held_out.best_folder(root) if held_out else None)
        log(f"checkpoint: {folder}")
    accelerator.wait_for_everyone()
    return folder


def _validate(accelerator, family, components, wrapped, config: Config, paths: RunPaths, step: int) -> list[Path]:
    samples: list[Path] = []
    if accelerator.is_main_process:
        trains = {name: accelerator.unwrap_model(m) for name, m in wrapped.items()}
        denoiser = trains.get("denoiser", components.denoiser)
        encoders = [trains.get(n, e) for n, e in zip(components.encoder_names, components.text_encoders, strict=True)]
        with frozen_encoders_on(components, accelerator.device):
            samples = run_validation(
                family, components, denoiser, encoders, config.validation,
                config.validation.resolution or config.data.resolution, accelerator.device,
                autocast_dtype(config), paths.samples, step, accelerator.trackers,
            )
    accelerator.wait_for_everyone()
    return samples


def _adapter_metadata(config: Config, family, method, components, step: int) -> dict[str, str]:
    return {
        "difftune.version": __version__,
        "difftune.base_model": config.model.path,
        "difftune.family": family.name,
        "difftune.method": method.name,
        "difftune.denoiser_config_sha256": family.denoiser_config_hash(components),
        "difftune.steps": str(step),
        "difftune.trigger": config.data.instance_prompt or "",
    }


def _write_card(config: Config, family, method, components, paths: RunPaths, step, dataset_entry, world, lr, result):
    details = method.card_details()
    sample_rel = []
    for p in result.samples:
        if p.name != "grid.png":
            prompt_index = int(p.name.split("-", 1)[0])
            sample_rel.append((config.validation.prompts[prompt_index], p.relative_to(paths.root).as_posix()))
    t = config.train
    training = {
        "Steps": step,
        "Learning rate": f"{lr:g} ({t.lr_scheduler}, {t.warmup_steps} warm-up steps)",
        "Optimizer": f"{t.optimizer} (β1 {t.adam_beta1}, β2 {t.adam_beta2}, weight decay {t.weight_decay})",
        "Batch": f"{t.batch_size} × {t.gradient_accumulation} accumulation × {world} process(es)",
        "Resolution": config.data.resolution,
        "Dataset": dataset_entry,
        "Mixed precision": mixed_precision(config) + (" (auto)" if t.mixed_precision == "auto" else ""),
        "Min-SNR γ": t.snr_gamma if t.snr_gamma is not None else "off",
        "Noise offset": t.noise_offset,
        "Seed": t.seed,
    }
    if result.performance:
        perf = result.performance
        training["Speed"] = f"{perf['median_step_seconds']:.3f} s per step (median, {perf['steps']} steps)"
        training["Peak memory"] = f"{perf['peak_memory_bytes'] / 2**30:.2f} GiB ({perf['peak_memory_kind']})"
    if result.val_losses:
        best_step, best_loss = min(result.val_losses, key=lambda sl: sl[1])
        training["Held-out loss"] = (f"{result.val_losses[-1][1]:.5f} at the end, best {best_loss:.5f} at step "
                                     f"{best_step}" + (" (stopped early)" if result.stopped_early else ""))
    if config.prior_preservation.class_prompt:
        pp = config.prior_preservation
        training["Prior preservation"] = f"`{pp.class_prompt}`, {pp.num_class_images} class images, weight {pp.loss_weight}"
    prompt = config.data.instance_prompt or (config.validation.prompts[0] if config.validation.prompts else "a photo")
    usage = details.get("usage", "").format(base_model=config.model.path, repo_or_folder=str(paths.root), prompt=prompt)
    write_model_card(
        paths.root / "README.md",
        base_model=config.model.path,
        family_title=family.title,
        tags=["text-to-image", "diffusers", "difftune", *details.get("tags", []), *family.card_tags],
        license=config.output.license,
        instance_prompt=config.data.instance_prompt,
        summary=details.get("summary", {}),
        training=training,
        samples=sample_rel,
        usage=usage,
        tool_usage=details.get("tool_usage", "").replace("{prompt}", prompt),
        title=f"{details.get('summary', {}).get('Method', method.name)} for "
              f"{Path(config.model.path).name or config.model.path}",
    )
