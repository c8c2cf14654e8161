"""Validation prompts with their own settings, sampled exactly as `difftune generate` samples them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from difftune import load_config
from difftune.cli import main
from difftune.errors import ConfigError
from difftune.training.loop import train


def test_each_sample_uses_its_own_settings_and_matches_difftune_generate(tmp_path, tiny_sd, shapes_data, run_config):
    validation = {"prompts": ["a red circle"], "steps": 2, "guidance_scale": 3.0, "seed": 4,
                  "samples": [{"prompt": "a blue square", "negative_prompt": "green", "guidance_scale": 5.0,
                               "seeds": [7, 9], "width": 48, "height": 32, "steps": 3}]}
    result = train(load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "run", validation=validation,
                                               train={"max_steps": 1})), log=lambda _m: None)
    folder = result.output_dir / "samples" / "step-1"
    assert sorted(p.name for p in folder.glob("*.png")) == ["00-seed4.png", "01-seed7.png", "01-seed9.png",
                                                            "grid.png"]
    assert Image.open(folder / "00-seed4.png").size == (32, 32)  # data.resolution
    assert Image.open(folder / "01-seed7.png").size == (48, 32)
    card = (result.output_dir / "README.md").read_text()
    assert "text: \"a blue square\"" in card and "samples/step-1/01-seed9.png" in card
    # `difftune generate` with the same settings and the trained LoRA makes the same pixels.
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_sd), "--lora", str(result.output_dir), "--prompt", "a blue square",
                 "--negative-prompt", "green", "--guidance", "5", "--seed", "7", "--steps", "3", "--width", "48",
                 "--height", "32", "--out", str(out)]) == 0
    preview = np.asarray(Image.open(folder / "01-seed7.png"))
    generated = np.asarray(Image.open(out / "00-00-seed7.png"))
    assert np.array_equal(preview, generated)
    # ...and the settings matter: another seed gives another image.
    assert not np.array_equal(preview, np.asarray(Image.open(folder / "01-seed9.png")))


@pytest.mark.parametrize(("sample", "message"), [
    ({"seeds": [1]}, r"validation.samples\[0\].prompt: required"),
    ({"prompt": "x", "width": 50}, r"validation.samples\[0\].width: 50 is not a multiple of 8"),
    ({"prompt": "x", "seeds": [1, 1]}, r"validation.samples\[0\].seeds: \[1, 1\] repeats a seed"),
    ({"prompt": "x", "guidance": 2.0}, r"validation.samples\[0\].guidance: unknown key"),
])
def test_bad_samples_are_refused(tmp_path, tiny_sd, shapes_data, run_config, sample, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data=run_config(tiny_sd, shapes_data, tmp_path, validation={"samples": [sample]}))
