"""DDPM objective: epsilon and v-prediction targets from the scheduler config, min-SNR-γ, noise offset."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from difftune.objectives.ddpm import DDPMObjective


def scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)


def test_epsilon_target_is_the_noise():
    obj = DDPMObjective(scheduler("epsilon"))
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = obj.noise(latents, timesteps=torch.tensor([10, 900]), noise=noise)
    assert torch.equal(out.target, noise)
    assert torch.equal(out.weights, torch.ones(2))


def test_v_prediction_target_follows_the_scheduler():
    sched = scheduler("v_prediction")
    obj = DDPMObjective(sched)
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    out = obj.noise(latents, timesteps=t, noise=noise)
    torch.testing.assert_close(out.target, sched.get_velocity(latents, noise, t))
    torch.testing.assert_close(out.noisy_latents, sched.add_noise(latents, noise, t))


@pytest.mark.parametrize(("prediction", "denominator_offset"), [("epsilon", 0.0), ("v_prediction", 1.0)])
def test_min_snr_weights(prediction, denominator_offset):
    sched = scheduler(prediction)
    obj = DDPMObjective(sched, snr_gamma=5.0)
    t = torch.tensor([1, 100, 500, 999])
    out = obj.noise(torch.zeros(4, 4, 8, 8), timesteps=t, noise=torch.zeros(4, 4, 8, 8))
    snr = compute_snr(sched, t)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + denominator_offset)
    torch.testing.assert_close(out.weights, expected.float())
    # Low-noise timesteps (high SNR) are down-weighted; high-noise ones are not boosted above 1 (epsilon).
    assert out.weights[0] < 0.1 and out.weights[-1] <= 1.0 + 1e-6


def test_noise_offset_shifts_channel_means():
    torch.manual_seed(0)
    plain = DDPMObjective(scheduler("epsilon")).noise(torch.zeros(64, 4, 16, 16)).target
    torch.manual_seed(0)
    offset = DDPMObjective(scheduler("epsilon"), noise_offset=0.5).noise(torch.zeros(64, 4, 16, 16)).target
    plain_spread = plain.mean(dim=(2, 3)).std()
    offset_spread = offset.mean(dim=(2, 3)).std()
    assert offset_spread > 3 * plain_spread


def test_per_sample_loss_is_weighted_mse():
    obj = DDPMObjective(scheduler("epsilon"), snr_gamma=5.0)
    out = obj.noise(torch.zeros(2, 1, 2, 2), timesteps=torch.tensor([1, 999]), noise=torch.ones(2, 1, 2, 2))
    losses = obj.per_sample_loss(torch.zeros(2, 1, 2, 2), out)
    torch.testing.assert_close(losses, out.weights)
