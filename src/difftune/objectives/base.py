"""The objective seam: how noise is added, what the denoiser predicts and how the loss is weighted."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class NoisedBatch:
    """A batch of noised latents with the timesteps used and the regression target."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    #: Per-sample loss weights from the objective (e.g. min-SNR), shape ``(batch,)``.
    weights: torch.Tensor


class Objective(ABC):
    """Samples timesteps and noise (from the global torch RNG, which the loop seeds per step).

    The loss between prediction and target is ``loss`` (``mse``, ``l1``, ``huber``, ``smooth_l1``) with
    the Huber δ ``huber_delta`` varied over the noise levels by ``huber_schedule``
    (``train.loss`` and its keys; :meth:`configure_loss`).
    """

    loss: str = "mse"
    #: How images must be sampled from a model trained with this objective, when it differs from the base
    #: model's defaults: ``scheduler`` (config overrides) and pipeline arguments (``guidance_rescale``).
    sampling: dict = {}
    huber_delta: float = 0.1
    huber_schedule: str = "constant"

    def configure_loss(self, train_cfg) -> Objective:
        """Take the loss settings of ``[train]``; returns the objective."""
        self.loss, self.huber_delta, self.huber_schedule = train_cfg.loss, train_cfg.huber_delta, train_cfg.huber_schedule
        return self

    @abstractmethod
    def noise(self, latents: torch.Tensor, timesteps: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> NoisedBatch:
        """Noise ``latents``; fixed ``timesteps``/``noise`` make the result deterministic."""

    @abstractmethod
    def noise_to_signal(self, timesteps: torch.Tensor) -> torch.Tensor:
        """σ/α of each timestep (the noise's scale over the signal's), fp32 on the CPU."""

    def delta(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample Huber δ at these timesteps, as ``huber_schedule`` says (kohya's schedules)."""
        c = self.huber_delta
        if self.huber_schedule == "constant":
            return torch.full(timesteps.shape, c, dtype=torch.float32)
        if self.huber_schedule == "exponential":
            total = float(getattr(self, "num_train_timesteps", 1000))
            return torch.exp(math.log(c) * timesteps.detach().cpu().float() / total)
        sigma = self.noise_to_signal(timesteps)
        return (1 - c) / (1 + sigma) ** 2 + c

    def per_sample_loss(self, prediction: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        """Weighted loss per sample, shape ``(batch,)``, computed in fp32."""
        diff = prediction.float() - noised.target.float()
        if self.loss == "mse":
            err = diff ** 2
        elif self.loss == "l1":
            err = diff.abs()
        else:
            c = self.delta(noised.timesteps).to(diff.device).view(-1, *([1] * (diff.ndim - 1)))
            err = 2 * (torch.sqrt(diff ** 2 + c ** 2) - c)
            if self.loss == "huber":
                err = err * c
        return err.flatten(1).mean(dim=1) * noised.weights

    def holdout_timesteps(self, count: int) -> torch.Tensor:
        """``count`` fixed, evenly spaced timesteps for the held-out loss (objectives may override)."""
        total = int(getattr(self, "num_train_timesteps", 1000))
        return ((torch.arange(count, dtype=torch.float64) + 0.5) * total / count).long().clamp(0, total - 1)
