"""Every shipped preset in configs/ validates, carries the command that runs it, and together they cover
every family, method and LoRA variant, prior preservation with both methods that use it, and the held-out loss."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from difftune import load_config
from difftune.cli import build_parser
from difftune.methods import METHODS
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


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_validates_and_its_command_runs_it(path):
    config = load_config(path, check_paths=False)
    argv = shlex.split(_command(path))[1:]
    assert argv[:2] == ["train", f"configs/{path.name}"], f"{path.name}: the header command is {argv}"
    args = build_parser().parse_args(argv)
    assert (Path(__file__).resolve().parents[1] / args.config).resolve() == path.resolve()
    load_config(path, overrides=args.set, check_paths=False)
    if config.method.type == "lora" and config.method.variant == "lora":
        # Recommended plain-LoRA settings; DoRA/LoHa/LoKr presets carry their own.
        assert 16 <= config.method.rank <= 32
        assert config.train.learning_rate == pytest.approx(1e-4)


def test_presets_cover_every_family_method_and_variant():
    configs = [load_config(p, check_paths=False) for p in PRESETS]
    assert {c.model.family for c in configs} - {"auto"} == set(FAMILIES.names())  # named where not SD 1.5
    assert {c.method.type for c in configs} == set(METHODS.names())
    assert {c.method.variant for c in configs if c.method.type == "lora"} == {"lora", "dora", "loha", "lokr"}
    assert any(c.prior_preservation.class_prompt and c.method.type == "lora" for c in configs)
    assert any(c.prior_preservation.class_prompt and c.method.type == "full" for c in configs)
    assert any(c.validation.holdout is not None for c in configs)
