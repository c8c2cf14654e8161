"""The processes of a run: the accelerator (device, mixed precision, trackers), gradient synchronisation,
and the check that every process ends with the same weights."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable

import torch

from difftune.config.loader import flat_config
from difftune.config.schema import Config
from difftune.errors import DifftuneError
from difftune.training.precision import mixed_precision
from difftune.training.speed import COMPILE_ON_CPU_PROBLEM


def make_accelerator(config: Config, paths):
    """An ``accelerate.Accelerator`` for this run, after refusing what this machine cannot do."""
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
    if config.model.offload != "none" and cpu:
        raise DifftuneError(f'model.offload = "{config.model.offload}": offloading moves blocks to a CUDA GPU '
                            'while they run; this machine has none. Set model.offload = "none"')
    if config.train.compile and cpu:
        raise DifftuneError(f"train.compile: {COMPILE_ON_CPU_PROBLEM}; set train.compile = false on this machine")
    return Accelerator(
        mixed_precision=mp,
        log_with=report,
        cpu=cpu,
        project_config=ProjectConfiguration(project_dir=str(paths.root), logging_dir=str(paths.logs)),
    )


def silent(_message: str) -> None:
    """A log for processes other than the main one."""


def main_process_log(accelerator, log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` on the main process, :func:`silent` on the others."""
    return log if accelerator.is_main_process else silent


def tracker_hparams(config: Config) -> dict[str, object]:
    """The flat config as trackers accept it (scalars as they are, anything else as JSON)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat_config(config).items()}


def start_trackers(accelerator, config: Config, run_name: str) -> None:
    if config.logging.report_to != "none":
        accelerator.init_trackers(config.logging.project, config=tracker_hparams(config),
                                  init_kwargs={"wandb": {"name": config.logging.run_name or run_name}})


def no_sync(accelerator, modules: Iterable[torch.nn.Module]) -> contextlib.ExitStack:
    """Skip the gradient all-reduce of these modules (micro-batches before the last of a step)."""
    stack = contextlib.ExitStack()
    for module in modules:
        stack.enter_context(accelerator.no_sync(module))
    return stack


def check_replicas_agree(accelerator, params: list[torch.nn.Parameter], log) -> None:
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
    log(f"all {accelerator.num_processes} processes hold identical trainable weights")
