"""The objective seam: how noise is added, what the denoiser predicts and how the loss is weighted."""

from __future__ import annotations

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
    """Samples timesteps and noise (from the global torch RNG, which the loop seeds per step)."""

    @abstractmethod
    def noise(self, latents: torch.Tensor, timesteps: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> NoisedBatch:
        """Noise ``latents``; fixed ``timesteps``/``noise`` make the result deterministic."""

    def per_sample_loss(self, prediction: torch.Tensor, noised: NoisedBatch) -> torch.Tensor:
        """Weighted MSE per sample, shape ``(batch,)``, computed in fp32."""
        err = (prediction.float() - noised.target.float()) ** 2
        return err.flatten(1).mean(dim=1) * noised.weights

    def holdout_timesteps(self, count: int) -> torch.Tensor:
        """``count`` fixed, evenly spaced timesteps for the held-out loss (objectives may override)."""
        total = int(getattr(self, "num_train_timesteps", 1000))
        return ((torch.arange(count, dtype=torch.float64) + 0.5) * total / count).long().clamp(0, total - 1)
