"""The training loop: build the run, step until done, and between steps log, sample, evaluate,
checkpoint or stop; then finish.

:func:`train` is the whole story in one screen. The parts: :func:`~difftune.training.setup.setup`
(everything built before the first step), :func:`~difftune.training.step.train_step` (one optimizer
step), the checks between steps below, and :func:`~difftune.training.finish.finish` (the result).
"""

from __future__ import annotations

import signal

from difftune.config.schema import Config
from difftune.training import checkpoint as ckpt
from difftune.training import checkpointing, faults
from difftune.training.finish import finish, validate
from difftune.training.precision import autocast_dtype
from difftune.training.run_folder import RunFolder
from difftune.training.setup import setup
from difftune.training.signals import StopRequest
from difftune.training.state import Run, RunResult
from difftune.training.step import train_step


def train(config: Config, log=print) -> RunResult:
    """Run a whole training job described by ``config`` and return what it produced.

    SIGINT (Ctrl-C) or SIGTERM stops it after the current step with a checkpoint
    (``RunResult.interrupted``); running out of GPU memory becomes a message saying what to change.
    """
    with faults.out_of_memory_advice(config), StopRequest(log) as stop, \
            RunFolder(config.output, config.train.resume) as folder:  # locked from claim to the end
        run = setup(config, log, folder)
        if stopped_while_building(run, stop):
            return finish(run)
        while run.step < run.total_steps:
            outcome = train_step(run, stop)
            if run.guard.should_stop:
                raise run.guard.error(save_last_good_state(run))
            if run.step % config.train.log_every == 0 or run.step == run.total_steps:
                log_loss(run)
            if run.samples and config.validation.every and run.step % config.validation.every == 0:
                validate(run)
            if run.held_out and run.held_out.due(run.step, run.total_steps):
                evaluate_held_out(run)
            if checkpoint_due(run):
                checkpointing.save(run)
                run.saved_step = run.step
            if outcome.stop_requested and run.step < run.total_steps:
                interrupt(run, stop)
                break
            if run.held_out and run.held_out.keeper.should_stop:
                stop_early(run)
                break
            run.monitor.restart_clock()  # validation, evaluation and checkpoints are not part of the step time
        return finish(run)


def save_last_good_state(run: Run):
    """After ``train.max_nan_steps`` non-finite steps in a row: checkpoint the state from before them."""
    guard = run.guard
    folder = checkpointing.save(run, guard.first_bad_step, scheduler_state=guard.scheduler_before_streak,
                                skipped=guard.skipped_before_streak)
    run.progress.close()
    return folder


def log_loss(run: Run) -> None:
    """The mean loss since the last log (over every process) and the learning rate: to trackers and the bar."""
    total = run.accelerator.reduce(run.losses.total, reduction="mean")
    mean_loss = (total / run.losses.count).item() if run.losses.count else float("nan")
    run.losses.reset()
    lr = run.scheduler.get_last_lr()[0]
    run.result.losses.append((run.step, mean_loss))
    run.live.metrics(run.step, loss=mean_loss, lr=lr)
    run.accelerator.log({"train/loss": mean_loss, "train/lr": lr}, step=run.step)
    run.progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)


def evaluate_held_out(run: Run) -> None:
    # Every process evaluates the same images, so all agree on early stopping without communicating.
    model = run.model
    with run.evaluating():
        evaluation = run.held_out.evaluate(model.family, model.components, model.objective, model.method,
                                           run.device, autocast_dtype(run.config), run.step)
    improved = run.held_out.keeper.record(evaluation)
    run.result.val_losses.append((run.step, evaluation.loss))
    values = {"val_loss": evaluation.loss}
    if evaluation.gain is not None:
        run.result.val_gains.append((run.step, evaluation.gain))
        values["val_word_gain"] = evaluation.gain
    run.live.metrics(run.step, **values)
    run.accelerator.log({k.replace("val_", "val/", 1): v for k, v in values.items()}, step=run.step)
    run.say(f"step {run.step}: {evaluation.describe()}" + (" (best so far)" if improved else ""))


def checkpoint_due(run: Run) -> bool:
    """Every ``train.checkpoint_every`` steps, and always at the last step (even with ``checkpoint_every = 0``:
    a finished run can always continue, raise ``train.max_steps`` and resume), but not while steps are being
    skipped (the last good state is older then)."""
    every = run.config.train.checkpoint_every
    due = run.step == run.total_steps or (every and run.step % every == 0)
    return bool(due) and not run.guard.in_row


def interrupt(run: Run, stop: StopRequest) -> None:
    """A stop signal: checkpoint (unless this step has one) and say how to resume."""
    saved = run.saved_step == run.step
    folder = run.paths.checkpoints / f"{ckpt.PREFIX}{run.step}" if saved else checkpointing.save(run)
    run.result.interrupted, run.result.skipped_steps = stop.signum, run.guard.skipped
    run.say(f"stopped by {stop.name} after step {run.step}; checkpoint {folder}. Resume with: "
            f"difftune train {run.paths.root / 'config.toml'} --set train.resume=latest")


def stopped_while_building(run: Run, stop: StopRequest) -> bool:
    """A stop signal while the run was being built (models loading, caches filling): stop before the
    first step, with nothing trained and nothing saved (a resumed run's checkpoint is still the newest)."""
    (requested,) = faults.agree(run.accelerator, stop.requested)
    if not requested:
        return False
    run.result.interrupted = stop.signum or signal.SIGTERM  # another process got the signal
    who = stop.name or "a signal to another process"
    if run.step:
        run.say(f"stopped by {who} before the first step: training was not resumed, checkpoint "
                f"{ckpt.PREFIX}{run.step} is unchanged")
    else:  # finish() removes the config.toml and logs of a run that never stepped
        run.say(f"stopped by {who} before the first step: nothing was trained or saved, and {run.paths.root} "
                "is as it was; run the same command to start again")
    return True


def stop_early(run: Run) -> None:
    """``validation.patience`` evaluations without a better held-out loss (or word gain)."""
    run.result.stopped_early = True
    keeper = run.held_out.keeper
    best = keeper.best_folder(run.paths.checkpoints)
    run.say(f"early stop at step {run.step}: no better held-out {keeper.by} in "
            f"{run.config.validation.patience} evaluations; best step {keeper.best.step}"
            + (f" (checkpoint {best})" if best else ""))
