"""Optimizers, learning-rate schedules, and how long a run is."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from difftune.config.schema import TrainConfig
from difftune.errors import DifftuneError

#: Devices with a fused AdamW kernel in torch (``torch.optim.AdamW(fused=True)``).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def _fused_adamw_supported(param_groups: list[dict]) -> bool:
    params = [p for group in param_groups for p in group["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params)


def build_optimizer(param_groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw":
        # One fused kernel per device and dtype where torch has one; else foreach, which still keeps
        # the step to a few large kernels instead of one per LoRA matrix.
        kernel = {"fused": True} if cfg.fused_optimizer and _fused_adamw_supported(param_groups) else {"foreach": True}
        return torch.optim.AdamW(
            param_groups, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay,
            eps=cfg.adam_epsilon, **kernel,
        )
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise DifftuneError("train.optimizer: adamw8bit (bitsandbytes) needs a CUDA GPU; use \"adamw\" here")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DifftuneError(
                "train.optimizer: adamw8bit needs bitsandbytes: pip install 'difftune[bnb]'"
            ) from None
        return bnb.optim.AdamW8bit(
            param_groups, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon
        )
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise DifftuneError("train.optimizer: prodigy needs prodigyopt: pip install 'difftune[prodigy]'") from None
        return Prodigy(param_groups, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay,
                       eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw_schedulefree":
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError:
            raise DifftuneError("train.optimizer: adamw_schedulefree needs schedulefree: "
                                "pip install 'difftune[schedulefree]'") from None
        return AdamWScheduleFree(param_groups, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay,
                                 eps=cfg.adam_epsilon, warmup_steps=cfg.warmup_steps)
    raise DifftuneError(f"train.optimizer: unknown optimizer {cfg.optimizer!r}")


def _schedule_free(optimizer) -> torch.optim.Optimizer | None:
    """The schedule-free optimizer inside ``optimizer`` (accelerate wraps it), or ``None``."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if hasattr(inner, "eval") and hasattr(inner, "train") and "train_mode" in inner.param_groups[0] else None


def start_training(optimizer) -> None:
    """Schedule-free AdamW: to its training weights (also after a checkpoint, saved in evaluation mode)."""
    inner = _schedule_free(optimizer)
    if inner is not None:
        inner.train()


@contextlib.contextmanager
def evaluation_weights(optimizer) -> Iterator[None]:
    """Schedule-free AdamW's evaluation weights (``optimizer.eval()``) in the parameters; afterwards the
    training weights come back exactly (copied back, not re-derived), so evaluating never changes training."""
    inner = _schedule_free(optimizer)
    if inner is None or not inner.param_groups[0]["train_mode"]:
        yield
        return
    params = [p for g in inner.param_groups for p in g["params"]]
    saved = [p.detach().clone() for p in params]
    inner.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
        for group in inner.param_groups:
            group["train_mode"] = True


@contextlib.contextmanager
def checkpoint_weights(optimizer) -> Iterator[None]:
    """Schedule-free AdamW in evaluation mode while a checkpoint is taken, then ``train()`` again: the same
    two steps a run resumed from that checkpoint takes (:func:`start_training`), so resuming is exact."""
    inner = _schedule_free(optimizer)
    if inner is None:
        yield
        return
    inner.eval()
    try:
        yield
    finally:
        inner.train()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=total_steps,
        num_cycles=cfg.lr_cycles,
        power=cfg.lr_power,
    )


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """``train.max_steps``, or ``train.epochs`` passes over the data in optimizer steps."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = -(-batches_per_epoch // cfg.gradient_accumulation)
    return max(1, cfg.epochs * per_epoch)


def learning_rate(cfg: TrainConfig, num_processes: int) -> float:
    """``train.learning_rate``, scaled by the global batch when ``train.scale_lr`` is on."""
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.batch_size * cfg.gradient_accumulation * num_processes
    return lr
