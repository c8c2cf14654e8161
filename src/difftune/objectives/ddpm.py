"""DDPM objective: epsilon or v-prediction; noise offset and input perturbation; min-SNR-γ and debiased
weighting; a timestep range and bias; zero-terminal-SNR rescaling of the noise schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_snr

from difftune.errors import ConfigError
from difftune.objectives.base import NoisedBatch, Objective


@dataclass(frozen=True)
class TimestepSampling:
    """Which timesteps are drawn, and how often: a range ``[low, high]`` and an optional bias."""

    low: int = 0
    high: int | None = None
    bias: str = "none"
    multiplier: float = 2.0
    portion: float = 0.25

    def weights(self, total: int) -> torch.Tensor | None:
        """Relative probability of each timestep; ``None`` for uniform over all (the plain ``randint`` draw)."""
        high = total - 1 if self.high is None else self.high
        if self.low == 0 and high == total - 1 and self.bias == "none":
            return None
        w = torch.zeros(total, dtype=torch.float64)
        w[self.low:high + 1] = 1.0
        biased = max(1, round(self.portion * (high + 1 - self.low)))
        if self.bias == "earlier":
            w[self.low:self.low + biased] *= self.multiplier
        elif self.bias == "later":
            w[high + 1 - biased:high + 1] *= self.multiplier
        return w / w.sum()


#: What sampling needs with a zero-terminal-SNR schedule (Lin et al. 2023): the rescaled betas, timesteps
#: that start at the last one, and guidance rescale 0.7 (the paper's φ) against over-exposure.
ZERO_TERMINAL_SNR_SCHEDULER = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
ZERO_TERMINAL_SNR_GUIDANCE_RESCALE = 0.7


class DDPMObjective(Objective):
    def __init__(self, noise_scheduler, *, snr_gamma: float | None = None, noise_offset: float = 0.0,
                 debiased: bool = False, input_perturbation: float = 0.0,
                 timesteps: TimestepSampling = TimestepSampling()) -> None:
        self.scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler config")
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.debiased = debiased
        self.input_perturbation = input_perturbation
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.timestep_weights = timesteps.weights(self.num_train_timesteps)

    def sample_timesteps(self, bsz: int, device) -> torch.Tensor:
        if self.timestep_weights is None:
            return torch.randint(0, self.num_train_timesteps, (bsz,), device=device).long()
        return torch.multinomial(self.timestep_weights, bsz, replacement=True).to(device)

    def noise(self, latents, timesteps=None, noise=None) -> NoisedBatch:
        bsz = latents.shape[0]
        input_noise = noise
        if noise is None:
            noise = torch.randn_like(latents)
            if self.noise_offset:
                # Shift each channel's mean so the model can learn overall brightness.
                noise = noise + self.noise_offset * torch.randn(
                    (bsz, latents.shape[1], 1, 1), device=latents.device, dtype=latents.dtype
                )
            input_noise = noise
            if self.input_perturbation:
                # Input perturbation: the input is made with extra noise, the target stays the plain noise.
                input_noise = noise + self.input_perturbation * torch.randn_like(noise)
        if timesteps is None:
            timesteps = self.sample_timesteps(bsz, latents.device)
        noisy = self.scheduler.add_noise(latents, input_noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        return NoisedBatch(noisy, timesteps, target, self._weights(timesteps).to(latents.device))

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        return compute_snr(self.scheduler, timesteps.cpu()).float()

    def noise_to_signal(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.snr(timesteps).clamp(min=1e-20).rsqrt()

    def _weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        weights = torch.ones(timesteps.shape[0], dtype=torch.float32)
        if self.snr_gamma is None and not self.debiased:
            return weights
        v_pred = self.prediction_type == "v_prediction"
        # A zero-terminal-SNR schedule has SNR 0 at its last step; a floor keeps the weights finite there.
        snr = self.snr(timesteps).clamp(min=1e-6)
        if self.snr_gamma is not None:
            clipped = torch.minimum(snr, torch.full_like(snr, self.snr_gamma))
            # Min-SNR-γ (Hang et al. 2023): epsilon weights min(snr, γ)/snr; v-prediction min(snr, γ)/(snr+1).
            weights = clipped / (snr + 1) if v_pred else clipped / snr
        if self.debiased:
            # Debiased estimation (Yu et al. 2023, as kohya): 1/√SNR, for v-prediction 1/(SNR+1); SNR capped at 1000.
            capped = snr.clamp(max=1000)
            weights = weights * (1 / (capped + 1) if v_pred else capped.rsqrt())
        return weights


def zero_terminal_snr_scheduler(noise_scheduler):
    """The family's noise scheduler with its betas rescaled to zero terminal SNR (diffusers' own rescale)."""
    if noise_scheduler.config.prediction_type != "v_prediction":
        raise ConfigError(
            "train.zero_terminal_snr: needs a v-prediction model (at zero terminal SNR the last timestep is pure "
            "noise, from which an epsilon model cannot say anything about the image); this model predicts "
            f"{noise_scheduler.config.prediction_type!r}. Unset train.zero_terminal_snr"
        )
    return type(noise_scheduler).from_config(noise_scheduler.config, **ZERO_TERMINAL_SNR_SCHEDULER)


def build(settings: dict, train_cfg) -> DDPMObjective:
    scheduler = settings["noise_scheduler"]
    if train_cfg.zero_terminal_snr:
        scheduler = zero_terminal_snr_scheduler(scheduler)
    sampling = TimestepSampling(train_cfg.timestep_min, train_cfg.timestep_max, train_cfg.timestep_bias,
                                train_cfg.timestep_bias_multiplier, train_cfg.timestep_bias_portion)
    objective = DDPMObjective(scheduler, snr_gamma=train_cfg.snr_gamma, noise_offset=train_cfg.noise_offset,
                              debiased=train_cfg.debiased_estimation, input_perturbation=train_cfg.input_perturbation,
                              timesteps=sampling)
    objective.configure_loss(train_cfg)
    if train_cfg.zero_terminal_snr:
        objective.sampling = {"scheduler": dict(ZERO_TERMINAL_SNR_SCHEDULER),
                              "guidance_rescale": ZERO_TERMINAL_SNR_GUIDANCE_RESCALE}
    return objective
