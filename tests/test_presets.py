"""Every shipped preset in configs/ validates, carries the command that runs it, and covers every family."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from difftune import load_config
from difftune.cli import build_parser
from difftune.models import FAMILIES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.toml"))


def _command(path: Path) -> str:
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if "difftune " in line:
            return line[line.index("difftune "):].strip()
    raise AssertionError(f"{path.name}: no 'difftune ...' command in the header comment")


def test_presets_exist():
    assert len(PRESETS) >= len(FAMILIES.names())


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_validates_and_its_command_runs_it(path):
    config = load_config(path, check_paths=False)
    argv = shlex.split(_command(path))[1:]
    args = build_parser().parse_args(argv)
    assert Path(args.config).resolve() == path.resolve(), f"{path.name}: the header command runs {args.config}"
    load_config(Path(args.config).resolve(), overrides=args.set, check_paths=False)
    if config.method.type == "lora" and config.method.variant == "lora":
        # Recommended plain-LoRA settings; DoRA/LoHa/LoKr presets carry their own.
        assert 16 <= config.method.rank <= 32
        assert config.train.learning_rate == pytest.approx(1e-4)


def test_every_family_has_a_preset():
    families = {load_config(p, check_paths=False).model.family for p in PRESETS}
    assert set(FAMILIES.names()) <= families
