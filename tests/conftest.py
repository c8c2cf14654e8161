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
# Under pytest-xdist (the README's `-n 2`) each worker takes its share of the cores, before torch starts:
# two workers of 2 OpenMP threads on 2 cores spin against each other (many times slower: seen here),
# while these small models train about as fast on one thread as on two.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

#: The longest test files, longest first (seconds under `-n 2`, one thread each, on a 2-core CPU): started
#: first, so that `--dist loadfile` never leaves one worker on the 10-minute demo while the other waits
#: (xdist would otherwise start the files with the most tests first: `pytest_configure` turns that off).
LONGEST_FILES = ("tests/world/test_demo.py",  # 600
                 "tests/training/test_distributed.py",  # 250
                 "tests/ui/test_browser.py",  # 140
                 "tests/world/test_learning.py",  # 115
                 "tests/training/test_fsdp_features.py")  # 120


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist is installed
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.path.as_posix()
        return next((k for k, name in enumerate(LONGEST_FILES) if path.endswith("/" + name)), len(LONGEST_FILES))

    items.sort(key=rank)  # stable: every other test keeps its order


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
    if base["method"].get("type") in ("full", "textual_inversion") and "rank" not in sections.get("method", {}):
        del base["method"]["rank"]  # a LoRA key; other methods refuse it
    return base


@pytest.fixture
def run_config():
    return tiny_run_config


@pytest.fixture
def train_run(tiny_sd, shapes_data, run_config, tmp_path):
    """Train the tiny model for a few steps; ``sections`` update the config section by section."""
    from difftune import load_config
    from difftune.training.loop import train

    def run(out_name: str = "out", data_path=None, log=None, **sections):
        out = tmp_path / out_name
        raw = run_config(tiny_sd, data_path or shapes_data, out, **sections)
        messages: list[str] = []
        result = train(load_config(data=raw), log=log or messages.append)
        result.messages = messages
        return result

    return run


# --- adapter files and a finished run, shared by the adapter, inference and publish tests ---------


@pytest.fixture(scope="session")
def lora_a(tiny_sd, tmp_path_factory) -> Path:
    """A difftune-format LoRA (UNet + text encoder), rank 4, alpha 8."""
    from adapter_helpers import make_lora

    return make_lora(tiny_sd, tmp_path_factory.mktemp("lora_a"), rank=4, alpha=8.0, seed=1)


@pytest.fixture(scope="session")
def lora_b(tiny_sd, tmp_path_factory) -> Path:
    """A second LoRA, rank 2, alpha 1, UNet only, on a different set of modules."""
    from adapter_helpers import make_lora

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
