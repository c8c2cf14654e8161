"""Numerical and memory faults during training: skip non-finite steps, explain running out of memory."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch

from difftune.config.schema import Config
from difftune.errors import DifftuneError

#: torch >= 2.5 has the device-independent name; torch.cuda.OutOfMemoryError derives from it.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def nonfinite(step_loss: torch.Tensor, grad_norm: torch.Tensor | float | None, scaler) -> torch.Tensor:
    """A 0-d bool tensor: is this step's loss (or, without a gradient scaler, its gradient norm) NaN/inf?

    No synchronisation happens here; the loop reads it together with the stop flag (one sync per step).
    With fp16 gradient scaling, inf gradients are normal while the scale settles; the scaler skips those.
    """
    bad = ~torch.isfinite(step_loss)
    if grad_norm is not None and scaler is None:
        bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device))
    return bad


def agree(accelerator, *flags: torch.Tensor | bool) -> list[bool]:
    """Read per-step flags with one device sync; with several processes, a flag raised by any counts for all."""
    device = accelerator.device
    values = torch.stack([torch.as_tensor(f, device=device).float().reshape(()) for f in flags])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="max")
    return [v > 0 for v in values.tolist()]


def optimizer_step(optimizer, bad: bool, scaler) -> bool:
    """Step unless ``bad``; return whether the weights changed.

    With fp16 gradient scaling (CUDA only) the scaler decides: it skips steps whose gradients hold
    inf/NaN (a NaN loss gives NaN gradients) and lowers its scale; accelerate reports that as
    ``step_was_skipped``.
    """
    if scaler is None:
        if bad:
            return False
        optimizer.step()
        return True
    optimizer.step()
    return not getattr(optimizer, "step_was_skipped", False)


class NonFiniteGuard:
    """Counts skipped steps and stops the run after ``limit`` non-finite steps in a row.

    It remembers the scheduler state from just before the first bad step of a streak: the weights
    and optimizer do not change on skipped steps, so that plus the step number is the last good state.
    """

    def __init__(self, limit: int, skipped: int = 0) -> None:
        self.limit = limit
        self.skipped = skipped  # all skipped optimizer steps, including fp16 scaler skips
        self.in_row = 0
        self.first_bad_step: int | None = None
        self.skipped_before_streak = skipped
        self.scheduler_before_streak: dict | None = None

    def record(self, step: int, stepped: bool, bad: bool, scheduler) -> None:
        """Call after the optimizer step of ``step`` (steps completed before it) and before ``scheduler.step()``."""
        if not stepped:
            self.skipped += 1
        if not bad:
            self.in_row, self.first_bad_step = 0, None
            return
        if self.in_row == 0:
            self.first_bad_step = step
            self.skipped_before_streak = self.skipped - 1
            self.scheduler_before_streak = copy.deepcopy(scheduler.state_dict())
        self.in_row += 1

    @property
    def should_stop(self) -> bool:
        return self.in_row >= self.limit

    def error(self, checkpoint: Path | None) -> DifftuneError:
        where = f"; the state before them is saved in {checkpoint}" if checkpoint else ""
        return DifftuneError(
            f"the loss was NaN or infinite for {self.in_row} steps in a row (train.max_nan_steps = {self.limit}), "
            f"starting at step {self.first_bad_step + 1}{where}. Lower train.learning_rate, use "
            "train.mixed_precision = \"bf16\" instead of \"fp16\", set train.max_grad_norm, or check the data "
            "(difftune data check); then resume with --set train.resume=latest"
        )


def memory_advice(config: Config) -> list[str]:
    """What to change in ``config`` to need less accelerator memory, most effective first."""
    t, d = config.train, config.data
    tips = []
    if t.batch_size > 1:
        tips.append(f"lower train.batch_size (now {t.batch_size}) and raise train.gradient_accumulation to keep "
                    "the effective batch")
    if not t.gradient_checkpointing:
        tips.append("set train.gradient_checkpointing = true")
    if not d.cache_latents:
        tips.append("set data.cache_latents = true (the VAE then leaves the GPU)")
    if not d.cache_text and not config.method.train_text_encoder:
        tips.append("set data.cache_text = true (the text encoders then leave the GPU)")
    if t.mixed_precision == "no":
        tips.append("set train.mixed_precision = \"bf16\"")
    if config.model.quantize in (None, "none") and config.method.type != "full":
        tips.append("quantize the frozen base model (model.quantize)")
    tips.append(f"lower data.resolution (now {d.resolution})")
    return tips


@contextlib.contextmanager
def out_of_memory_advice(config: Config) -> Iterator[None]:
    """Turn an out-of-memory error into a message saying what to change; checkpoints are left as they are."""
    try:
        yield
    except OutOfMemoryError as exc:
        from difftune.training.checkpoint import newest_complete

        previous = newest_complete(Path(config.output.dir) / "checkpoints")
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DifftuneError(
            f"out of GPU memory ({first_line}). "
            + (f"The previous checkpoint {previous} is intact (resume with --set train.resume=latest). "
               if previous else "")
            + "To fit: " + "; ".join(memory_advice(config))
        ) from exc
