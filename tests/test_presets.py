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


SD1_PRESETS = [p for p in PRESETS if "stable-diffusion-v1-5" in p.read_text()]


@pytest.mark.slow
@pytest.mark.parametrize("path", SD1_PRESETS, ids=lambda p: p.name)
def test_sd1_preset_trains_on_the_embedded_base(path, tmp_path):
    """Each SD 1.x preset, as shipped but on difftune:shapes at 64 px for two steps, trains and exports."""
    from difftune.training.loop import train
    from difftune.world.data import write_pretraining_set

    data = write_pretraining_set(tmp_path / "data", 6)
    overrides = [
        "model.path=difftune:shapes", f"data.path={data}", "data.resolution=64", f"output.dir={tmp_path / 'run'}",
        "train.max_steps=2", "train.batch_size=2", "train.gradient_accumulation=1", "train.warmup_steps=0",
        "train.checkpoint_every=0", "validation.every=0", "validation.steps=2", "validation.loss_every=0",
        "logging.report_to=none", "train.mixed_precision=bf16",  # fp16 presets need a CUDA GPU
    ]
    if load_config(path, check_paths=False).prior_preservation.enabled:
        overrides += [f"prior_preservation.class_data={tmp_path / 'class'}", "prior_preservation.num_class_images=2",
                      "prior_preservation.sample_steps=2"]
    config = load_config(path, overrides=overrides)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # accelerate keeps one mixed precision per process: leave none behind
    try:
        result = train(config, log=lambda _msg: None)
    finally:
        AcceleratorState._reset_state()
    assert result.steps == 2 and result.files and all(Path(f).exists() for f in result.files)
