"""DDPM objective: epsilon or v-prediction, noise offset and min-SNR-γ weighting."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr

from difftune.objectives.base import NoisedBatch, Objective


class DDPMObjective(Objective):
    def __init__(self, noise_scheduler, *, snr_gamma: float | None = None, noise_offset: float = 0.0) -> None:
        self.scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler config")
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)

    def noise(self, latents, timesteps=None, noise=None) -> NoisedBatch:
        bsz = latents.shape[0]
        if noise is None:
            noise = torch.randn_like(latents)
            if self.noise_offset:
                # Shift each channel's mean so the model can learn overall brightness.
                noise = noise + self.noise_offset * torch.randn(
                    (bsz, latents.shape[1], 1, 1), device=latents.device, dtype=latents.dtype
                )
        if timesteps is None:
            timesteps = torch.randint(0, self.num_train_timesteps, (bsz,), device=latents.device).long()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        return NoisedBatch(noisy, timesteps, target, self._weights(timesteps).to(latents.device))

    def _weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self.snr_gamma is None:
            return torch.ones(timesteps.shape[0], dtype=torch.float32)
        snr = compute_snr(self.scheduler, timesteps.cpu()).float()
        clipped = torch.minimum(snr, torch.full_like(snr, self.snr_gamma))
        # Min-SNR-γ (Hang et al. 2023): epsilon weights min(snr, γ)/snr; v-prediction min(snr, γ)/(snr+1).
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr


def build(settings: dict, train_cfg) -> DDPMObjective:
    return DDPMObjective(
        settings["noise_scheduler"], snr_gamma=train_cfg.snr_gamma, noise_offset=train_cfg.noise_offset
    )
