"""Speed settings of a training run, applied in one place: ``train.channels_last`` and ``train.compile``.

(Mixed precision is :mod:`difftune.training.precision`; what a method does under autocast is its
``on_autocast`` hook.)
"""

from __future__ import annotations

import dataclasses

import torch

from difftune.config.schema import TrainConfig
from difftune.models.base import Components

#: Why ``train.compile`` is refused without CUDA. Measured with torch 2.13 / diffusers 0.42 / peft 0.21:
#: the "inductor" backend's backward through a LoRA UNet on CPU returned wrong LoRA gradients (some
#: blocks zero) while the "eager" and "aot_eager" backends matched eager exactly, and the compiled
#: step was no faster.
COMPILE_ON_CPU_PROBLEM = (
    "torch.compile on CPU gave wrong LoRA gradients in difftune's checks (and no speed-up); "
    "it is only allowed with a CUDA GPU"
)


def apply(cfg: TrainConfig, components: Components, train_view: Components, log=print) -> Components:
    """Apply the speed settings; return the view the training step uses.

    Compiling wraps only the training view's denoiser, so validation, held-out evaluation and
    export keep using the eager module (their no-grad calls would otherwise trigger recompiles).
    """
    if cfg.channels_last:
        # Only the denoiser: latents from a channels-last VAE would make ``randn_like`` lay the same
        # random numbers out differently, so a seed would no longer give the same noise.
        components.denoiser.to(memory_format=torch.channels_last)
    if cfg.compile:
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        train_view = dataclasses.replace(train_view, denoiser=torch.compile(train_view.denoiser, mode=mode))
        log(f"torch.compile ({cfg.compile_mode}): the first steps compile the denoiser; the compile time is "
            "reported at the end of the run")
    return train_view
