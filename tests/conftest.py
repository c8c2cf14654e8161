"""Shared fixtures: tiny models built from config (never downloaded) and small datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny SD 1.x-style diffusers folder (epsilon prediction)."""
    from difftune.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """A tiny SD 2.x-style folder (v-prediction scheduler)."""
    from difftune.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.fixture
def shapes_data(tmp_path) -> Path:
    """Four 64 px images with captions in metadata.jsonl."""
    from difftune.tiny import make_tiny_dataset

    return make_tiny_dataset(tmp_path / "data", n=4, size=64)


def tiny_run_config(model_path: Path, data_path: Path, out_dir: Path, **sections) -> dict:
    """A config mapping for a fast CPU run; ``sections`` update the defaults section by section."""
    base = {
        "model": {"path": str(model_path)},
        "method": {"type": "lora", "rank": 4},
        "data": {"path": str(data_path), "resolution": 32},
        "train": {"max_steps": 4, "learning_rate": 1e-3, "checkpoint_every": 0, "log_every": 1,
                  "mixed_precision": "no"},
        "logging": {"report_to": "none"},
        "output": {"dir": str(out_dir)},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


@pytest.fixture
def run_config():
    return tiny_run_config
