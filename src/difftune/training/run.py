"""Everything a training run sets up around the loop: accelerator, trackers, paths, resume info."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftune.config.loader import flat_config
from difftune.config.schema import Config
from difftune.errors import DifftuneError
from difftune.seeds import derived_seed
from difftune.training.performance import COMPILE_ON_CPU_PROBLEM
from difftune.training.precision import mixed_precision


@dataclass
class RunPaths:
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
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    #: (step, held-out loss) for each evaluation; empty without ``validation.holdout``.
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    #: True if ``validation.patience`` stopped the run early.
    stopped_early: bool = False
    #: The signal number (SIGINT, SIGTERM) that stopped the run after a checkpoint; ``None`` if it finished.
    interrupted: int | None = None
    #: Optimizer steps skipped because the loss or gradients were NaN/inf (fp16: scaler skips too).
    skipped_steps: int = 0
    #: Step times and peak memory (see ``training.performance.RunMonitor.summary``).
    performance: dict = field(default_factory=dict)


def make_accelerator(config: Config, paths: RunPaths):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    mp = mixed_precision(config)
    report = None if config.logging.report_to == "none" else config.logging.report_to
    if report == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise DifftuneError("logging.report_to: wandb needs the extra: pip install 'difftune[wandb]'") from None
    cpu = not torch.cuda.is_available()
    if mp == "fp16" and cpu:
        raise DifftuneError(
            "train.mixed_precision: fp16 needs a CUDA GPU (gradient scaling); on CPU use \"bf16\" or \"no\""
        )
    if config.train.compile and cpu:
        raise DifftuneError(f"train.compile: {COMPILE_ON_CPU_PROBLEM}; set train.compile = false on this machine")
    return Accelerator(
        mixed_precision=mp,
        log_with=report,
        cpu=cpu,
        project_config=ProjectConfiguration(project_dir=str(paths.root), logging_dir=str(paths.logs)),
    )


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for one optimizer step on one process, so resuming at any step replays it exactly."""
    return derived_seed(seed, step, rank)


#: Keys whose change does not change what a resumed run computes.
RESUME_NEUTRAL = ("train.resume", "train.resume_force", "train.checkpoint_every", "train.checkpoints_keep",
                  "train.log_every", "train.max_nan_steps", "validation", "logging", "output", "data.num_workers")


#: Exceptions inside the neutral sections: the held-out split decides which images train.
RESUME_RELEVANT = ("validation.holdout",)


def resume_relevant(config: Config) -> dict[str, object]:
    return {
        k: v for k, v in flat_config(config).items()
        if k in RESUME_RELEVANT or not any(k == n or k.startswith(n + ".") for n in RESUME_NEUTRAL)
    }


def config_hash(config: Config) -> str:
    return hashlib.sha256(json.dumps(resume_relevant(config), sort_keys=True, default=str).encode()).hexdigest()


def tracker_hparams(config: Config) -> dict[str, object]:
    out = {}
    for k, v in flat_config(config).items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def total_steps(config: Config, batches_per_epoch: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    per_epoch = -(-batches_per_epoch // config.train.gradient_accumulation)
    return max(1, config.train.epochs * per_epoch)


def learning_rate(config: Config, num_processes: int) -> float:
    lr = config.train.learning_rate
    if config.train.scale_lr:
        lr *= config.train.batch_size * config.train.gradient_accumulation * num_processes
    return lr


def with_modules(components, modules: dict[str, torch.nn.Module]):
    """A view of ``components`` where the trainable modules are replaced by their wrapped versions."""
    encoders = [modules.get(name, enc) for name, enc in zip(components.encoder_names, components.text_encoders,
                                                             strict=True)]
    return dataclasses.replace(components, denoiser=modules.get("denoiser", components.denoiser),
                               text_encoders=encoders)
