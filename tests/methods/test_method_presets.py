"""Every shipped preset in configs/ is a valid config and says how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from difftune import load_config
from difftune.methods import METHODS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(CONFIGS.glob("*.toml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_is_valid_and_names_its_command(path):
    config = load_config(path, check_paths=False)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"difftune train configs/{path.name}" in line for line in header), "header lacks the run command"
    assert config.method.type in METHODS


def test_every_method_and_variant_has_a_preset():
    configs = [load_config(p, check_paths=False) for p in PRESETS]
    assert set(METHODS.names()) <= {c.method.type for c in configs}
    assert {"dora", "loha", "lokr"} <= {c.method.variant for c in configs}
    assert any(c.prior_preservation.class_prompt and c.method.type == "lora" for c in configs)
    assert any(c.prior_preservation.class_prompt and c.method.type == "full" for c in configs)
    assert any(c.validation.holdout is not None for c in configs)
