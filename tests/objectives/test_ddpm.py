"""DDPM objective: epsilon and v-prediction targets from the scheduler config, min-SNR-γ, noise offset."""

from __future__ import annotations

import math

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


def _ddpm(train=None, prediction="epsilon", **train_keys):
    from difftune import load_config
    from difftune.objectives import OBJECTIVES

    cfg = load_config(data={"model": {"path": "m"}, "data": {"path": "d"}, "train": train_keys},
                      check_paths=False).train
    return OBJECTIVES.get("ddpm")({"noise_scheduler": scheduler(prediction)}, cfg)


def test_loss_types_give_their_documented_values():
    t = torch.tensor([10, 990])
    zeros = torch.zeros(2, 1, 2, 2)
    noised = _ddpm().noise(zeros, timesteps=t, noise=torch.full((2, 1, 2, 2), 3.0))  # error 3 everywhere
    assert torch.allclose(_ddpm(loss="mse").per_sample_loss(zeros, noised), torch.tensor([9.0, 9.0]))
    assert torch.allclose(_ddpm(loss="l1").per_sample_loss(zeros, noised), torch.tensor([3.0, 3.0]))
    c = 0.5
    huber = _ddpm(loss="huber", huber_delta=c, huber_schedule="constant").per_sample_loss(zeros, noised)
    expected = 2 * c * (math.sqrt(9 + c * c) - c)
    assert torch.allclose(huber, torch.tensor([expected, expected]))
    smooth = _ddpm(loss="smooth_l1", huber_delta=c, huber_schedule="constant").per_sample_loss(zeros, noised)
    assert torch.allclose(smooth, torch.tensor([expected / c, expected / c]))


def test_huber_schedules_move_delta_with_the_noise_level():
    t = torch.tensor([0, 500, 999])
    exp = _ddpm(loss="huber", huber_delta=0.1, huber_schedule="exponential").delta(t)
    assert torch.allclose(exp, 0.1 ** (t.float() / 1000))
    snr_obj = _ddpm(loss="huber", huber_delta=0.1, huber_schedule="snr")
    sigma = compute_snr(snr_obj.scheduler, t).rsqrt()
    assert torch.allclose(snr_obj.delta(t), 0.9 / (1 + sigma) ** 2 + 0.1)
    assert snr_obj.delta(t)[0] > 0.8 and snr_obj.delta(t)[-1] < 0.11  # ~1 at low noise, δ at high noise


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_debiased_estimation_weights(prediction):
    obj = _ddpm(prediction=prediction, debiased_estimation=True)
    t = torch.tensor([1, 100, 999])
    snr = compute_snr(obj.scheduler, t).clamp(max=1000)
    expected = 1 / (snr + 1) if prediction == "v_prediction" else snr.rsqrt()
    out = obj.noise(torch.zeros(3, 1, 2, 2), timesteps=t, noise=torch.zeros(3, 1, 2, 2))
    torch.testing.assert_close(out.weights, expected.float())


def test_timestep_range_and_bias_shape_the_sampled_distribution():
    torch.manual_seed(0)
    ranged = _ddpm(timestep_min=200, timestep_max=399).sample_timesteps(20000, "cpu")
    assert ranged.min() >= 200 and ranged.max() <= 399 and ranged.float().std() > 50
    torch.manual_seed(0)
    later = _ddpm(timestep_bias="later", timestep_bias_multiplier=3.0, timestep_bias_portion=0.25).sample_timesteps(
        20000, "cpu")
    share = (later >= 750).float().mean()  # the last quarter drawn 3x as often: 0.75/(0.75+0.75) = 0.5
    assert abs(share - 0.5) < 0.02
    torch.manual_seed(0)
    earlier = _ddpm(timestep_bias="earlier", timestep_bias_portion=0.5).sample_timesteps(20000, "cpu")
    assert abs((earlier < 500).float().mean() - 2 / 3) < 0.02


def test_input_perturbation_noises_the_input_but_not_the_target():
    latents, t = torch.zeros(4, 1, 8, 8), torch.tensor([100, 400, 700, 999])
    torch.manual_seed(0)
    plain = _ddpm().noise(latents, timesteps=t)
    torch.manual_seed(0)
    perturbed = _ddpm(input_perturbation=0.5).noise(latents, timesteps=t)
    assert torch.equal(plain.target, perturbed.target)
    extra = perturbed.noisy_latents - plain.noisy_latents
    assert extra.abs().mean() > 0.05


def test_zero_terminal_snr_rescales_the_schedule_for_v_prediction_only():
    from difftune.errors import ConfigError

    obj = _ddpm(prediction="v_prediction", zero_terminal_snr=True, snr_gamma=5.0)
    assert obj.scheduler.alphas_cumprod[-1] < 1e-6 < scheduler("v_prediction").alphas_cumprod[-1]
    assert obj.sampling == {"scheduler": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
                            "guidance_rescale": 0.7}
    out = obj.noise(torch.ones(1, 1, 2, 2), timesteps=torch.tensor([999]), noise=torch.zeros(1, 1, 2, 2))
    assert out.noisy_latents.abs().max() < 1e-3 and torch.isfinite(out.weights).all()  # the last step is pure noise
    with pytest.raises(ConfigError, match="train.zero_terminal_snr: needs a v-prediction model"):
        _ddpm(zero_terminal_snr=True)
