"""Optimizers, learning-rate schedules, and how long a run is."""

from __future__ import annotations

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
    raise DifftuneError(f"train.optimizer: unknown optimizer {cfg.optimizer!r}")


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
