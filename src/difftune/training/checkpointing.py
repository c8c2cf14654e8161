"""A run's checkpoints: where it resumes from, what it restores, and what it saves.

The files themselves (atomic folders, manifests, pruning) are :mod:`difftune.training.checkpoint`;
what a checkpoint says about its run and whether a run may continue from it is
:mod:`difftune.training.resume`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftune.adapters.safe_load import non_finite
from difftune.config.schema import Config
from difftune.errors import DifftuneError
from difftune.methods.ema import split_state, upgrade_legacy
from difftune.training import checkpoint as ckpt
from difftune.training.distributed import all_agree, load_sharded, local_part, save_sharded
from difftune.training.optim import checkpoint_weights
from difftune.training.resume import CheckpointInfo, check_compatible, checkpoint_info, restore_rng
from difftune.training.state import Run, RunPaths
from difftune.version import __version__


def resume_folder(config: Config, paths: RunPaths, accelerator, say) -> Path | None:
    """The checkpoint ``train.resume`` names (``latest``: the newest intact one), or ``None``."""
    resume = config.train.resume
    if not resume:
        return None
    if resume == "latest":
        if accelerator.is_main_process:  # a kill during a save may have left a staging folder or a moved-aside checkpoint
            ckpt.repair(paths.checkpoints, say)
        accelerator.wait_for_everyone()
        folder = ckpt.find_resumable(paths.checkpoints, say, repair_first=False)
        if folder is None:
            say(f"train.resume = \"latest\": no checkpoint in {paths.checkpoints}, starting from step 0")
        return folder
    folder = Path(resume).expanduser()
    problem = ckpt.verify(folder)
    if problem:
        raise DifftuneError(f"train.resume: {folder} cannot be used ({problem})")
    return folder


def load_for_resume(folder: Path, config: Config, fingerprint: str, accelerator, say) -> ckpt.TrainingState:
    """This process's view of the checkpoint, after checking it belongs to this run."""
    state = ckpt.load_checkpoint(folder, accelerator.process_index)
    check_compatible(CheckpointInfo.read(state.info), config, fingerprint, accelerator.num_processes, say)
    return state


#: What the config sets in each optimizer parameter group: on resume these apply over the checkpoint's.
HYPER_PARAMETERS = ("lr", "initial_lr", "betas", "weight_decay", "eps")


def restore_before_wrapping(state: ckpt.TrainingState, method, components, optimizer, scheduler,
                            sharded_run: bool = False, say=print) -> float:
    """Trainable weights (and their EMA), optimizer state and schedule position, into the modules and
    optimizer as built (FSDP: sharded).

    The config's hyper-parameters (learning rate, betas, weight decay, epsilon) apply over the
    checkpoint's, so what the run reports is what it runs: the schedule continues from the
    checkpoint's step with the configured base rates. Returns the checkpoint's base rate relative to
    this run's (1.0: unchanged; per-group multipliers such as LoRA+ cancel out).
    """
    configured = [{k: g[k] for k in HYPER_PARAMETERS if k in g} for g in optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    if state.sharded is not None:  # written by an FSDP run: loads sharded over any number of processes, or whole
        load_sharded(state.sharded, method.trainable_modules(components), optimizer, method.ema)
        scheduler_state = state.scheduler
    elif sharded_run:
        raise DifftuneError("train.resume: the checkpoint was written by a train.distributed "
                            "= \"ddp\" run (whole weights); resume it with train.distributed = \"ddp\"")
    else:
        own, ema = split_state(upgrade_legacy(state.trainable, method.trainable_modules(components)))
        method.load_trainable_state_dict(components, own)
        if method.ema is not None:
            try:
                method.ema.load_state_dict(ema)
            except ValueError as exc:
                raise DifftuneError(f"method.ema: cannot resume: {exc}; resume without method.ema, "
                                    "or start afresh") from None
        optimizer_state, scheduler_state = regrouped(state.optimizer, state.scheduler, optimizer, say)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    ratio = float(scheduler.base_lrs[0]) / float(base_lrs[0])
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update(values)
    factors = getattr(scheduler, "lr_lambdas", None)
    rates = ([base * f(scheduler.last_epoch) for base, f in zip(base_lrs, factors, strict=True)] if factors else
             [g["lr"] * base / old for g, base, old in zip(optimizer.param_groups, base_lrs, scheduler.base_lrs,
                                                           strict=True)])
    scheduler.base_lrs = base_lrs
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports (the progress bar, trackers)
    return ratio


def learning_rate_segments(info: CheckpointInfo, before: float, lr: float, say) -> list[list[float]]:
    """``[[step, learning rate], ...]``: the rates the run has trained with, from the checkpoint on."""
    segments = [list(s) for s in (info.lr_segments or [[0, before]])]
    if before != lr:  # a stretch that trained no step (a change at the checkpoint's own step) is replaced
        segments = [s for s in segments if s[0] < info.step] + [[info.step, lr]]
        say(f"train.learning_rate: the resumed optimizer and schedule use {lr:g} ({before:g} before), "
            f"applied from step {info.step}")
    return segments


#: Per-group lists in a learning-rate scheduler's state.
_SCHEDULER_LISTS = ("base_lrs", "_last_lr")


def regrouped(saved: dict, scheduler: dict, optimizer, say) -> tuple[dict, dict]:
    """The saved optimizer and scheduler state arranged in ``optimizer``'s parameter groups.

    A checkpoint written before difftune grouped parameters as it does now (one group where there are
    now several, e.g. per model part) holds the same parameters in the same order: each parameter keeps
    its state, and each new group the learning rate of the old group its first parameter was in (the
    schedule's position; ``restore_before_wrapping`` then applies the configured rates over it).
    """
    groups = optimizer.state_dict()["param_groups"]
    old = saved["param_groups"]
    if len(old) == len(groups):
        return saved, scheduler
    flat_old = [(g, i) for g, group in enumerate(old) for i in group["params"]]
    if len(flat_old) != sum(len(g["params"]) for g in groups):
        raise DifftuneError(
            f"train.resume: the checkpoint's optimizer holds {len(flat_old)} parameters in {len(old)} group(s), "
            f"this run trains {sum(len(g['params']) for g in groups)}; resume with the settings it was written "
            "with, or start afresh")
    state, new_groups, source, k = {}, [], [], 0
    for group in groups:
        first_old_group = flat_old[k][0]
        params = []
        for new_index in group["params"]:
            old_index = flat_old[k][1]
            if old_index in saved["state"]:
                state[new_index] = saved["state"][old_index]
            params.append(new_index)
            k += 1
        hyper = {key: value for key, value in old[first_old_group].items() if key != "params"}
        new_groups.append({**group, **hyper, "params": params})
        source.append(first_old_group)
    scheduler = dict(scheduler)
    for key in _SCHEDULER_LISTS:
        if isinstance(scheduler.get(key), list) and len(scheduler[key]) == len(old):
            scheduler[key] = [scheduler[key][g] for g in source]
    say(f"note: the checkpoint's optimizer state had {len(old)} parameter group(s), this run has {len(groups)}: "
        "each parameter keeps its state and each group the configured learning rate")
    return {"state": state, "param_groups": new_groups}, scheduler


def restore_after_wrapping(state: ckpt.TrainingState, accelerator, say) -> None:
    """Gradient scaler (fp16) and this process's random state, once accelerate has set things up."""
    if accelerator.scaler is not None and state.scaler:
        accelerator.scaler.load_state_dict(state.scaler)
    restore_rng(state, accelerator.process_index, say)


def save(run: Run, step: int | None = None, *, scheduler_state: dict | None = None,
         skipped: int | None = None) -> Path | None:
    """Checkpoint the run as it stood after ``step`` (default: now). Every process calls this.

    ``scheduler_state`` and ``skipped`` replace the current ones when saving an earlier state (the
    last good step before a run of non-finite steps). Returns the folder on the main process.
    """
    step = run.step if step is None else step
    refuse_non_finite(run, "no checkpoint was written")
    info = checkpoint_info(run.config, step, run.fingerprint, len(run.data.scan.examples), run.data.order,
                           run.micro_batch_at(step), run.world, run.guard.skipped if skipped is None else skipped,
                           __version__)
    info.holdout = run.held_out.keeper.checkpoint_facts(step) if run.held_out else None
    info.lr_segments = run.lr_segments or None
    root = run.paths.checkpoints
    state = _training_state(run, step, scheduler_state) if run.is_main else None
    model = run.model
    sharded = ((lambda folder: save_sharded(folder, model.wrapped, run.optimizer, model.method.ema))
               if model.strategy.shards else None)
    try:
        folder = ckpt.save_checkpoint(root, step, state, info.to_json(), rank=run.rank,
                                      barrier=run.accelerator.wait_for_everyone, sharded=sharded)
    except OSError as exc:
        newest = ckpt.newest_complete(root) if root.is_dir() else None
        kept = f"the last good checkpoint is {newest}" if newest else "no earlier checkpoint was saved"
        run.progress.close()
        raise DifftuneError(f"the checkpoint of step {step} could not be written in {root} "
                            f"({exc.strerror or exc}); {kept}") from None
    if run.is_main:
        if run.held_out:
            run.held_out.keeper.mark_checkpoint(root, folder, step, info.holdout)
        ckpt.prune(root, run.config.train.checkpoints_keep,
                   protect=run.held_out.keeper.best_folder(root) if run.held_out else None)
        run.say(f"checkpoint: {folder}")
    run.accelerator.wait_for_everyone()
    return folder


def refuse_non_finite(run: Run, what: str) -> None:
    """A run never checkpoints or ends "done" with NaN/inf weights: it stops, naming the last good checkpoint.

    Every process checks its own parameters (replicas hold the same weights, so all stop together; FSDP
    shards differ, so the processes agree first)."""
    finite = all(bool(torch.isfinite(local_part(p)).all()) for p in run.model.params)
    if run.model.strategy.shards:
        finite = all_agree(run.accelerator, finite)
    if finite:
        return
    bad = [] if run.model.strategy.shards else non_finite(run.model.method.trainable_state_dict(run.model.components))
    bad = bad or ["a trainable parameter"]
    newest = ckpt.newest_complete(run.paths.checkpoints)
    kept = f"the last good checkpoint is {newest}" if newest else "no checkpoint had been saved"
    run.progress.close()
    raise DifftuneError(f"the trained weights hold NaN or infinity after step {run.step} ({bad[0]}): {what}; "
                        f"{kept}. Lower train.learning_rate or set train.max_grad_norm and resume from it")


def _training_state(run: Run, step: int, scheduler_state: dict | None) -> ckpt.TrainingState:
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # the optimizer inside accelerate's wrapper
    scaler = run.accelerator.scaler
    scheduler_state = scheduler_state or run.scheduler.state_dict()
    scaler_state = scaler.state_dict() if scaler is not None else None
    if run.model.strategy.shards:  # the weights and optimizer state are in the sharded part
        return ckpt.TrainingState(step, None, None, scheduler_state, scaler_state)
    method = run.model.method
    with checkpoint_weights(optimizer):  # schedule-free AdamW: its evaluation weights, as the docs ask
        trainable = method.trainable_state_dict(run.model.components)
        optimizer_state = optimizer.state_dict()  # its tensors (z, moments) do not change with the mode
    if method.ema is not None:
        trainable.update(method.ema.state_dict())
    return ckpt.TrainingState(step, trainable, optimizer_state, scheduler_state, scaler_state)
