"""Rectified-flow (flow-matching) objective used by SD3 and Flux.

A sample at noise level σ ∈ (0, 1) is ``(1 - σ)·x + σ·ε``; the denoiser predicts the velocity
``ε - x``. σ is drawn from a density (uniform, logit-normal or "mode", SD3 paper §5.1), then
shifted toward noise by the model's shift: a fixed ``shift`` (SD3) or one that grows with the
image's token count (Flux's dynamic shift), so large images see enough high-noise steps.
"""

from __future__ import annotations

import math

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from difftune.objectives.base import NoisedBatch, Objective


class FlowMatchObjective(Objective):
    def __init__(self, *, num_train_timesteps: int = 1000, shift: float = 1.0, dynamic_shift: dict | None = None,
                 patch_size: int = 1, weighting_scheme: str = "none", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, noise_offset: float = 0.0) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        self.dynamic_shift = dynamic_shift
        self.patch_size = patch_size
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.noise_offset = noise_offset

    def sample_sigmas(self, latents: torch.Tensor) -> torch.Tensor:
        u = compute_density_for_timestep_sampling(
            self.weighting_scheme, latents.shape[0], logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale,
        ).clamp(1e-5, 1 - 1e-5)
        return self.shifted(u, latents.shape[-2:])

    def shifted(self, sigmas: torch.Tensor, latent_hw) -> torch.Tensor:
        """Apply the model's timestep shift to σ ∈ (0, 1)."""
        if self.dynamic_shift:
            d = self.dynamic_shift
            seq_len = (latent_hw[0] // self.patch_size) * (latent_hw[1] // self.patch_size)
            slope = (d["max_shift"] - d["base_shift"]) / (d["max_seq_len"] - d["base_seq_len"])
            mu = d["base_shift"] + slope * (seq_len - d["base_seq_len"])
            # The exponential time shift of FlowMatchEulerDiscreteScheduler: σ' = e^μ / (e^μ + 1/σ - 1).
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        s = self.shift
        return s * sigmas / (1 + (s - 1) * sigmas)

    def noise(self, latents, timesteps=None, noise=None) -> NoisedBatch:
        if noise is None:
            noise = torch.randn_like(latents)
            if self.noise_offset:
                # As for DDPM: a per-channel constant lets the model learn overall brightness.
                noise = noise + self.noise_offset * torch.randn(
                    (latents.shape[0], latents.shape[1], *([1] * (latents.ndim - 2))), device=latents.device,
                    dtype=latents.dtype)
        if timesteps is None:
            sigmas = self.sample_sigmas(latents).to(latents.device)
            timesteps = sigmas * self.num_train_timesteps
        else:
            sigmas = timesteps.float() / self.num_train_timesteps
        s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1 - s) * latents + s * noise
        weights = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas).float().to(latents.device)
        return NoisedBatch(noisy, timesteps, noise - latents, weights)

    def noise_to_signal(self, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = (timesteps.detach().cpu().float() / self.num_train_timesteps).clamp(1e-6, 1 - 1e-6)
        return sigmas / (1 - sigmas)


def build(settings: dict, train_cfg) -> FlowMatchObjective:
    """``settings`` come from the family (scheduler shift, dynamic-shift constants, patch size)."""
    shift = train_cfg.flow_shift if train_cfg.flow_shift is not None else settings.get("shift", 1.0)
    dynamic = None if train_cfg.flow_shift is not None else settings.get("dynamic_shift")
    return FlowMatchObjective(
        num_train_timesteps=settings.get("num_train_timesteps", 1000), shift=shift, dynamic_shift=dynamic,
        patch_size=settings.get("patch_size", 1), weighting_scheme=train_cfg.weighting_scheme,
        logit_mean=train_cfg.logit_mean, logit_std=train_cfg.logit_std, mode_scale=train_cfg.mode_scale,
        noise_offset=train_cfg.noise_offset,
    ).configure_loss(train_cfg)
