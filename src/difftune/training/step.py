"""One optimizer step: accumulate micro-batches, clip, step, in one device sync."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from difftune.data.batch import Batch
from difftune.seeds import derived_seed
from difftune.training import faults
from difftune.training.distributed import full_value
from difftune.training.loss import micro_batch_loss
from difftune.training.precision import autocast, autocast_dtype
from difftune.training.signals import StopRequest
from difftune.training.state import Run


@dataclass
class StepOutcome:
    """What one optimizer step did; ``step_loss`` stays on the device (summed over micro-batches)."""

    step_loss: torch.Tensor
    #: The loss or gradients were NaN/inf (on any process): no optimizer step was taken.
    bad: bool
    #: The weights changed (False for a bad step, or when the fp16 scaler skipped it).
    stepped: bool
    #: Someone asked to stop (SIGINT/SIGTERM on any process); the loop checkpoints and returns.
    stop_requested: bool


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for one optimizer step on one process, so resuming at any step replays it exactly."""
    return derived_seed(seed, step, rank)


def sample_seed(seed: int, step: int, index: int) -> int:
    """The seed of the ``index``-th image of step ``step``'s global batch (over every micro-batch and process)."""
    return derived_seed(seed, step, "sample", index)


def with_sample_seeds(batch: Batch, run: Run, micro: int) -> Batch:
    """``batch`` with a seed per image from its place in the step's global batch: micro-batch ``micro`` of
    every process together is one global micro-batch, of which this process holds the ``rank``-th share
    (the batch order deals it so). The draws of a global batch then do not depend on how it is split."""
    first = (micro * run.world + run.rank) * len(batch)
    return dataclasses.replace(batch, seeds=[sample_seed(run.config.train.seed, run.step, first + i)
                                             for i in range(len(batch))])


def train_step(run: Run, stop: StopRequest | None = None) -> StepOutcome:
    """Accumulate ``train.gradient_accumulation`` micro-batches, clip, and step (unless the loss is not finite).

    ``stop`` is read after the micro-batches, so a signal that arrives during this step stops the run after it.
    """
    model, acc, train = run.model, run.accelerator, run.config.train
    # Every random draw of this step comes from a seed derived from (seed, step, process).
    torch.manual_seed(step_seed(train.seed, run.step, run.rank))
    step_loss = torch.zeros((), device=run.device)
    # The whole forward under autocast, frozen modules too (the accelerator's autocast wraps only the
    # trainable ones; textual inversion feeds fp32 text states to a frozen bf16 denoiser). FSDP computes
    # in its mixed-precision policy's dtype instead.
    amp_dtype = None if model.strategy.shards else autocast_dtype(run.config)
    for micro in range(train.gradient_accumulation):
        batch = model.method.prepare_batch(with_sample_seeds(next(run.batches), run, micro))
        last = micro == train.gradient_accumulation - 1
        with contextlib.nullcontext() if last or run.world == 1 else model.strategy.no_sync(acc, model.wrapped):
            with autocast(run.device, amp_dtype):
                loss = micro_batch_loss(model.family, model.train_view, model.objective, batch, run.device,
                                        model.trains_text)
            acc.backward(loss / train.gradient_accumulation)
        step_loss += loss.detach()
    grad_norm = None
    if train.max_grad_norm is not None:
        grad_norm = full_value(acc.clip_grad_norm_(model.params, train.max_grad_norm))
    # The one device sync per step: is the step non-finite, and did anyone ask to stop?
    bad, stop_now = faults.agree(acc, faults.nonfinite(step_loss, grad_norm, acc.scaler),
                                 stop is not None and stop.requested)
    stepped = faults.optimizer_step(run.optimizer, bad, acc.scaler)
    run.guard.record(run.step, stepped, bad, run.scheduler)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    if stepped:
        model.method.after_step(run.step, model.components)
    elif bad:
        run.say(f"step {run.step}: the loss is NaN or infinite; skipped it ({run.guard.in_row} in a row, "
                f"limit train.max_nan_steps = {run.guard.limit})")
    if not bad:
        run.losses.add(step_loss, train.gradient_accumulation)
    run.progress.update(1)
    run.monitor.step_done()
    run.live.step_done(run.step)
    return StepOutcome(step_loss, bad, stepped, stop_now)
