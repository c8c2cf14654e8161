"""Fixtures for the adapter tests: LoRA files on the tiny SD model, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from adapter_helpers import make_lora  # noqa: E402


@pytest.fixture(scope="session")
def lora_a(tiny_sd, tmp_path_factory) -> Path:
    """A difftune-format LoRA (UNet + text encoder), rank 4, alpha 8."""
    return make_lora(tiny_sd, tmp_path_factory.mktemp("lora_a"), rank=4, alpha=8.0, seed=1)


@pytest.fixture(scope="session")
def lora_b(tiny_sd, tmp_path_factory) -> Path:
    """A second LoRA, rank 2, alpha 1, UNet only, on a different set of modules."""
    return make_lora(tiny_sd, tmp_path_factory.mktemp("lora_b"), rank=2, alpha=1.0, seed=7, text_encoder=False,
                     unet_targets=("to_q", "to_v", "proj_in"))


@pytest.fixture(scope="session")
def trained_run(tiny_sd, tmp_path_factory):
    """A real 2-step difftune training run with one validation prompt (samples and a card)."""
    from difftune import load_config
    from difftune.tiny import make_tiny_dataset
    from difftune.training.loop import train

    root = tmp_path_factory.mktemp("run")
    data = make_tiny_dataset(root / "data", n=2, size=32)
    cfg = {
        "model": {"path": str(tiny_sd)},
        "method": {"type": "lora", "rank": 4, "alpha": 2},
        "data": {"path": str(data), "resolution": 32, "instance_prompt": "sks shape"},
        "train": {"max_steps": 2, "learning_rate": 1e-3, "checkpoint_every": 1, "mixed_precision": "no"},
        "validation": {"prompts": ["a red circle"], "steps": 2},
        "logging": {"report_to": "none"},
        "output": {"dir": str(root / "out")},
    }
    result = train(load_config(data=cfg), log=lambda *_: None)
    return result.output_dir
