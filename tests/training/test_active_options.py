"""The active-options block: printed by `difftune validate` without torch, at the start of a run, in logs/ and
in the model card; zero terminal SNR reaches the sampler the previews use."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from difftune import load_config
from difftune.cli import main
from difftune.config.loader import dump_toml
from difftune.training.finish import finish
from difftune.training.setup import setup
from difftune.training.step import train_step


def test_validate_prints_the_block_without_torch(tmp_path, tiny_sd, shapes_data, run_config):
    raw = run_config(tiny_sd, shapes_data, tmp_path / "out", method={"train_text_encoder": True},
                     train={"loss": "huber", "huber_delta": 0.2, "snr_gamma": 5.0, "timestep_bias": "later"})
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(raw))
    code = ("import sys, runpy; sys.argv = ['difftune', 'validate', sys.argv[1]]\n"
            "from difftune.cli import main\nrc = main()\nassert 'torch' not in sys.modules, 'torch imported'\n"
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "active options:" in out.stdout
    assert "loss: huber (δ 0.2, snr schedule); weighting: min-SNR γ 5.0" in out.stdout
    assert "timesteps: 0–last, later 0.25 drawn ×2" in out.stdout
    assert "off: data.cache_text off: the text encoder trains" in out.stdout
    assert 'snr_gamma = 5.0, loss = "huber", huber_delta = 0.2, timestep_bias = "later"' in out.stdout


def test_run_prints_logs_and_cards_the_block_and_samples_at_zero_terminal_snr(
        tmp_path, tiny_sd_v, shapes_data, run_config, monkeypatch):
    import diffusers

    calls = []
    original = diffusers.StableDiffusionPipeline.__call__

    def recording(self, *args, **kwargs):
        calls.append((kwargs.get("guidance_rescale"), dict(self.scheduler.config)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "__call__", recording)
    raw = run_config(tiny_sd_v, shapes_data, tmp_path / "out",
                     train={"max_steps": 1, "zero_terminal_snr": True, "debiased_estimation": True},
                     validation={"prompts": ["a red circle"], "steps": 2})
    messages = []
    run = setup(load_config(data=raw), log=messages.append)
    block = next(m for m in messages if m.startswith("active options:"))
    assert "family: Stable Diffusion" in block and "v_prediction prediction" in block
    assert "weighting: debiased estimation" in block and "zero terminal SNR" in block
    assert "sampling: scheduler = {'rescale_betas_zero_snr': True, 'timestep_spacing': 'trailing'}, " \
           "guidance_rescale = 0.7" in block
    train_step(run)
    finish(run)
    out = tmp_path / "out"
    assert (out / "logs" / "options.txt").read_text() == block + "\n"
    assert "### Active options\n\n```\n" + block + "\n```" in (out / "README.md").read_text()
    assert calls and all(rescale == 0.7 for rescale, _ in calls)
    assert all(cfg["rescale_betas_zero_snr"] and cfg["timestep_spacing"] == "trailing" for _, cfg in calls)
    # difftune generate reads the sampler settings from the LoRA's header and makes the preview's pixels.
    calls.clear()
    gen = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_sd_v), "--lora", str(out), "--prompt", "a red circle", "--steps", "2",
                 "--guidance", "7", "--seed", "0", "--width", "32", "--height", "32", "--out", str(gen)]) == 0
    assert calls[0][0] == 0.7 and calls[0][1]["rescale_betas_zero_snr"]
    preview = np.asarray(Image.open(out / "samples" / "step-1" / "00-seed0.png"))
    assert np.array_equal(preview, np.asarray(Image.open(gen / "00-00-seed0.png")))


def test_the_block_states_each_group_its_given_rate_not_the_warm_up_start(tmp_path, tiny_sd, shapes_data,
                                                                          run_config):
    raw = run_config(tiny_sd, shapes_data, tmp_path / "out", method={"train_text_encoder": True},
                     train={"max_steps": 20, "learning_rate": 1e-3, "warmup_steps": 10, "lr_scheduler": "cosine"})
    messages = []
    setup(load_config(data=raw), log=messages.append)
    block = next(m for m in messages if m.startswith("active options:"))
    assert "learning rates: denoiser 0.001, text_encoder 0.001" in block, block


def test_a_key_unset_with_none_trains_shows_and_stays_unset_in_the_runs_config(
        tmp_path, tiny_sd, shapes_data, run_config):
    """``--set train.max_grad_norm=none`` (no clipping; the default is 1.0): the run starts (the options block
    once raised "cannot write None as TOML"), shows it, and the run's config.toml reads back unset, not 1.0."""
    from difftune.config.loader import apply_overrides

    raw = apply_overrides(run_config(tiny_sd, shapes_data, tmp_path / "out", train={"max_steps": 1}),
                          ["train.max_grad_norm=none"])
    messages = []
    run = setup(load_config(data=raw), log=messages.append)
    block = next(m for m in messages if m.startswith("active options:"))
    assert "max_grad_norm = none" in block
    train_step(run)
    finish(run)
    written = (tmp_path / "out" / "config.toml").read_text()
    assert 'max_grad_norm = "none"' in written
    again = load_config(path=str(tmp_path / "out" / "config.toml"), check_paths=False)
    assert again.train.max_grad_norm is None and again.train.snr_gamma is None  # unset stays unset
