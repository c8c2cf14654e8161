"""What a run holds while it trains: built once by :func:`~difftune.training.setup.setup`, advanced by
:func:`~difftune.training.step.train_step`, closed by :func:`~difftune.training.finish.finish`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.config.resolve import ValidationSample, validation_samples
from difftune.config.schema import Config
from difftune.data.batch import Batch
from difftune.data.cache import frozen_encoders_on
from difftune.data.pipeline import TrainingData
from difftune.methods.base import Method
from difftune.models.base import Components, ModelFamily
from difftune.objectives.base import Objective
from difftune.training.distributed import Strategy
from difftune.training.faults import NonFiniteGuard
from difftune.training.holdout import HeldOutLoss
from difftune.training.performance import RunMonitor
from difftune.training.progress import RunProgress


@dataclass
class RunPaths:
    """Where a run writes: the output folder and its parts."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


@dataclass
class RunResult:
    """What a finished run produced."""

    output_dir: Path
    files: list[Path]
    #: The step the run ended at: ``train.max_steps`` when it finished, earlier when a signal or early
    #: stopping ended it.
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    #: (step, held-out loss) for each evaluation; empty without ``validation.holdout``.
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    #: (step, held-out word gain) for each evaluation; empty without ``validation.holdout_word``.
    val_gains: list[tuple[int, float]] = field(default_factory=list)
    #: True if ``validation.patience`` stopped the run early.
    stopped_early: bool = False
    #: The signal number (SIGINT, SIGTERM) that stopped the run after a checkpoint; ``None`` if it finished.
    interrupted: int | None = None
    #: Optimizer steps skipped because the loss or gradients were NaN/inf (fp16: scaler skips too).
    skipped_steps: int = 0
    #: Step times and peak memory (see ``training.performance.RunMonitor.summary``).
    performance: dict = field(default_factory=dict)


@dataclass
class Trainee:
    """What trains and how its loss is computed: the model, the method and the objective."""

    family: ModelFamily
    #: The model as loaded (eager, unwrapped modules): validation, evaluation and export use it.
    components: Components
    method: Method
    objective: Objective
    #: The trainable modules by role, as the accelerator wrapped them (DDP) for the step.
    wrapped: dict[str, nn.Module]
    #: ``components`` with the wrapped (and possibly compiled) modules: what a training step runs.
    train_view: Components
    #: The parameters the optimizer updates.
    params: list[nn.Parameter]
    #: True if a text encoder trains (prompt encoding then keeps its graph).
    trains_text: bool
    #: How the processes share the work (``ddp`` or ``fsdp``).
    strategy: Strategy = field(default_factory=lambda: Strategy("ddp", 1, 1, "none"))
    #: FSDP: the trained modules' skeletons (parameters on the meta device) the export gathers into.
    skeletons: dict[str, nn.Module] = field(default_factory=dict)

    def trainable_modules(self) -> list[nn.Module]:
        return list(self.wrapped.values())


@dataclass
class LossMeter:
    """Sum of the finite step losses since the last log, kept on the device (no sync per step)."""

    total: torch.Tensor
    count: int = 0

    def add(self, step_loss: torch.Tensor, micro_batches: int) -> None:
        self.total += step_loss
        self.count += micro_batches

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0


@dataclass
class Run:
    """A training run in progress: everything the step, the checks between steps and the end read."""

    config: Config
    paths: RunPaths
    accelerator: Any
    #: Messages for people: prints on the main process, does nothing on the others.
    say: Callable[[str], None]
    model: Trainee
    data: TrainingData
    held_out: HeldOutLoss | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    guard: NonFiniteGuard
    monitor: RunMonitor
    batches: Iterator[Batch]
    #: Learning rate after ``train.scale_lr``.
    lr: float
    total_steps: int
    #: Optimizer steps completed.
    step: int
    #: The step and micro-batch this run (segment) started from; 0, 0 unless resumed.
    first_step: int
    first_micro_batch: int
    #: Hash of the training examples (checkpoints record it; resuming compares it).
    fingerprint: str
    result: RunResult
    progress: Any
    #: ``logs/progress.json`` and ``logs/metrics.jsonl`` (main process; a no-op on the others).
    live: RunProgress
    losses: LossMeter
    #: The newest step with a checkpoint written by this run (so an interrupt does not write it twice).
    saved_step: int = 0
    #: The output folder, locked while the run runs (:class:`~difftune.training.run_folder.RunFolder`).
    folder: Any = None
    #: ``[[step, learning rate], ...]``: the base rate from each step on (changed by a resume).
    lr_segments: list = field(default_factory=list)

    @property
    def samples(self) -> list[ValidationSample]:
        """The validation prompts with their settings (``validation.prompts`` and ``validation.samples``)."""
        return validation_samples(self.config.validation, self.config.data)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def micro_batch_at(self, step: int) -> int:
        """This process's micro-batch index at the start of ``step`` (the data position a checkpoint records)."""
        return self.first_micro_batch + (step - self.first_step) * self.config.train.gradient_accumulation

    @contextlib.contextmanager
    def evaluating(self, *, encoders: bool = True, purpose: str = "validate") -> Iterator[None]:
        """What validation, the held-out loss (``purpose="validate"``) and export (``"export"``) see: the
        trained modules in eval mode, schedule-free AdamW's evaluation weights, the EMA weights when
        ``method.ema_validate`` / ``method.ema_export`` say so, and with ``encoders`` offloaded frozen
        encoders back on the device (export needs none). The one place where a run switches weights;
        the training weights come back exactly afterwards."""
        from difftune.training.optim import evaluation_weights

        modules = self.model.trainable_modules()
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        ema, cfg = self.model.method.ema, self.config.method
        use_ema = ema is not None and (cfg.ema_export if purpose == "export" else cfg.ema_validate)
        try:
            with (frozen_encoders_on(self.model.components, self.device) if encoders else contextlib.nullcontext(),
                  evaluation_weights(self.optimizer), ema.swapped_in() if use_ema else contextlib.nullcontext()):
                yield
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.train(mode)
