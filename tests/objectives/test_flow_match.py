"""The flow_match objective: interpolation, target, σ sampling, timestep shift and loss weighting."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from difftune import load_config
from difftune.models.components import flow_match_settings
from difftune.objectives import OBJECTIVES
from difftune.objectives.flow_match import FlowMatchObjective


def _train_cfg(**train):
    return load_config(data={"model": {"path": "m"}, "data": {"path": "d"}, "train": train}, check_paths=False).train


def test_noisy_latents_and_velocity_target():
    obj = FlowMatchObjective()
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([250.0, 900.0])
    nb = obj.noise(x, timesteps=t, noise=eps)
    s = (t / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(nb.noisy_latents, (1 - s) * x + s * eps)
    assert torch.allclose(nb.target, eps - x)
    assert torch.equal(nb.weights, torch.ones(2))
    # A perfect velocity prediction has zero loss.
    assert torch.allclose(obj.per_sample_loss(eps - x, nb), torch.zeros(2))


def test_static_shift_matches_the_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    obj = OBJECTIVES.get("flow_match")(flow_match_settings(sched, patch_size=2), _train_cfg())
    sigma = torch.tensor([0.25, 0.5, 0.9])
    assert torch.allclose(obj.shifted(sigma, (64, 64)), 3 * sigma / (1 + 2 * sigma))
    # The scheduler's own training sigmas are the shifted grid.
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000
    assert torch.allclose(obj.shifted(unshifted, (64, 64)), sched.sigmas.float(), atol=1e-5)


def test_dynamic_shift_grows_with_resolution_like_flux():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    obj = OBJECTIVES.get("flow_match")(flow_match_settings(sched, patch_size=2), _train_cfg())
    sigma = torch.tensor([0.5])
    small = obj.shifted(sigma, (32, 32))    # 16×16 = 256 packed patches → μ = base_shift
    large = obj.shifted(sigma, (128, 128))  # 64×64 = 4096 patches → μ = max_shift
    assert torch.allclose(small, sched.time_shift(0.5, 1.0, sigma))
    assert torch.allclose(large, sched.time_shift(1.15, 1.0, sigma))
    assert large > small > sigma
    # train.flow_shift replaces the dynamic shift with a fixed one.
    fixed = OBJECTIVES.get("flow_match")(flow_match_settings(sched, 2), _train_cfg(flow_shift=1.0))
    assert torch.allclose(fixed.shifted(sigma, (128, 128)), sigma)


@pytest.mark.parametrize(("scheme", "check"), [
    ("none", lambda s: abs(s.mean() - 0.5) < 0.03),
    ("logit_normal", lambda s: s.mean() > 0.75),  # logit_mean = 2 pushes σ toward noise
    ("mode", lambda s: abs(s.mean() - 0.5) < 0.03 and s.std() < 0.27),  # heavier middle than uniform
])
def test_sigma_sampling_schemes(scheme, check):
    extra = {"logit_mean": 2.0} if scheme == "logit_normal" else {}
    obj = OBJECTIVES.get("flow_match")({"shift": 1.0}, _train_cfg(weighting_scheme=scheme, **extra))
    torch.manual_seed(0)
    sigmas = obj.sample_sigmas(torch.zeros(20000, 1, 2, 2))
    assert ((sigmas > 0) & (sigmas < 1)).all()
    assert check(sigmas)


def test_loss_weighting_schemes_reach_the_loss():
    x, eps = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    t = torch.tensor([500.0, 250.0])
    sqrt = OBJECTIVES.get("flow_match")({}, _train_cfg(weighting_scheme="sigma_sqrt")).noise(x, t, eps)
    assert torch.allclose(sqrt.weights, torch.tensor([4.0, 16.0]))
    cosmap = OBJECTIVES.get("flow_match")({}, _train_cfg(weighting_scheme="cosmap")).noise(x, t, eps)
    assert torch.allclose(cosmap.weights[0], torch.tensor(2 / (math.pi * 0.5)))
    loss = OBJECTIVES.get("flow_match")({}, _train_cfg()).per_sample_loss(torch.zeros_like(x), sqrt)
    assert torch.allclose(loss, torch.tensor([4.0, 16.0]))  # unit error × weight


def test_ddpm_keys_are_refused_with_a_pointer_to_weighting_scheme():
    from difftune.errors import ConfigError
    from difftune.objectives import check_train_keys

    for key, value in (("snr_gamma", 5.0), ("zero_terminal_snr", True), ("debiased_estimation", True),
                       ("timestep_max", 500), ("input_perturbation", 0.1)):
        with pytest.raises(ConfigError, match=f"train.{key}: does not apply to Flux.*train.weighting_scheme"):
            check_train_keys("flow_match", "Flux", _train_cfg(**{key: value}))
    with pytest.raises(ConfigError, match="train.weighting_scheme: does not apply to SD.*train.snr_gamma"):
        check_train_keys("ddpm", "SD", _train_cfg(weighting_scheme="logit_normal"))
    check_train_keys("flow_match", "Flux", _train_cfg(weighting_scheme="logit_normal", flow_shift=3.0))


def test_noise_offset_shifts_each_channel():
    obj = OBJECTIVES.get("flow_match")({}, _train_cfg(noise_offset=0.5))
    x = torch.zeros(64, 2, 8, 8)
    torch.manual_seed(0)
    nb = obj.noise(x, timesteps=torch.full((64,), 1000.0))  # σ = 1: the noisy latents are the noise
    channel_means = nb.noisy_latents.mean(dim=(2, 3))
    assert channel_means.std() > 0.3  # plain N(0, 1) noise would give about 1/8


def test_huber_loss_and_its_snr_schedule_for_flow_matching():
    obj = OBJECTIVES.get("flow_match")({}, _train_cfg(loss="huber", huber_delta=0.2, huber_schedule="snr"))
    t = torch.tensor([100.0, 900.0])
    sigma = (t / 1000) / (1 - t / 1000)
    torch.testing.assert_close(obj.delta(t), 0.8 / (1 + sigma) ** 2 + 0.2)
    x, eps = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    nb = obj.noise(x, timesteps=t, noise=eps)
    c = obj.delta(t)
    expected = 2 * c * (torch.sqrt(4 + c ** 2) - c)  # error 2 everywhere, pseudo-Huber with each sample's δ
    torch.testing.assert_close(obj.per_sample_loss(torch.zeros_like(x), nb), expected)
