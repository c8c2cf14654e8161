"""`difftune demo` teaches the embedded base the star: the judge sees it after the LoRA and not
before, the other attributes stay right, and the user is told where everything is."""

from __future__ import annotations

import pytest
from PIL import Image

from difftune.cli import main
from difftune.demo import BASE, CONCEPT, GRID_PROMPTS, SEEDS, STEPS, TRAIN_SCENES, demo_config

pytestmark = pytest.mark.slow

def test_demo_learns_the_new_shape_and_reports_it(tmp_path, capsys):
    """The demo exactly as a user runs it (its own number of steps)."""
    assert main(["demo", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    n = len(GRID_PROMPTS) * len(SEEDS)
    line = next(x for x in out.splitlines() if f"shows the new concept ({CONCEPT})" in x)
    before, after = (int(part.split("/")[0]) for part in line.split(": ")[1].split(" -> "))
    assert before <= n // 8, f"the base already draws the {CONCEPT}: {line}"
    # Measured with the shipped base: 0/16 -> 12/16 in fp32 (what `auto` picks for this base on every CPU
    # since 2026-12-03; AVX-512 BF16 and AVX2 CPUs alike), 13/16 in bf16 (AVX-512 BF16 CPU),
    # others 100 % -> 100 % in both (docs/world.md). The asserts are the goals (the star on >= 70 %:
    # 12 of 16; others >= 85 %); the scattered-star demo scored 2/16.
    assert after >= 12 * n // 16, f"the LoRA did not teach the {CONCEPT}: {line}"
    others = next(x for x in out.splitlines() if "other attributes still right" in x)
    assert int(others.rsplit("-> ", 1)[1].rstrip("%")) >= 85, others  # measured 100 % -> 100 %
    position = next(x for x in out.splitlines() if "position as asked" in x)
    assert "/6 -> " in position and "does not follow position words" in position
    for name in ("pytorch_lora_weights.safetensors", "README.md", "logs"):
        assert (tmp_path / "run" / name).exists(), name
    grid = Image.open(tmp_path / "demo-grid.png")
    assert grid.width > len(GRID_PROMPTS) * 100 and grid.height > 4 * 100
    assert str(tmp_path / "demo-grid.png") in out
    assert len(list((tmp_path / "zorb-images").glob("*.png"))) == len(TRAIN_SCENES)


def test_demo_never_takes_a_folder_it_did_not_make(tmp_path, capsys):
    """--dir naming a folder with someone else's files is refused before anything is written."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["demo", "--steps", "2", "--dir", str(tmp_path)]) == 2
    assert "holds files the demo did not write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "run"]


def test_demo_refuses_a_step_count_that_is_none(tmp_path, capsys):
    assert main(["demo", "--steps", "0", "--dir", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.strip() == f"difftune: error: demo --steps: 0; give at least 1 training step (default {STEPS})"
    assert not (tmp_path / "d").exists()  # nothing written
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert f"the demo's own, {STEPS})" in " ".join(capsys.readouterr().out.split())


def test_demo_settings_reach_the_run(tmp_path):
    """What benchmarks/quantized_demo.py relies on: a changed key is the run's, the rest stays the demo's."""
    from difftune.run_config import load_config

    data = demo_config(tmp_path / "a", tmp_path / "b", tmp_path / "out", 2, {"method": {"rank": 4}, "model": {"quantize": "int8"}})
    config = load_config(data=data, check_paths=False)
    assert config.method.rank == 4 and config.model.quantize == "int8"
    assert config.method.train_text_encoder and config.train.max_steps == 2 and config.model.path == BASE


def test_demo_trains_the_embedded_base_in_fp32_on_a_cpu(tmp_path, monkeypatch):
    """The demo leaves precision to `auto` (fp32 for this small base, bf16 never where the CPU would emulate
    it): asking for bf16 made it take about half an hour on a CPU that emulates bf16, against 8 minutes in fp32."""
    from difftune.run_config import load_config
    from difftune.training.precision import mixed_precision

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    config = load_config(data=demo_config(tmp_path / "a", tmp_path / "b", tmp_path / "out", 2), check_paths=False)
    assert config.train.mixed_precision == "auto"
    assert mixed_precision(config) == "no"  # the embedded base at 64 px: fp32 is the faster on every CPU
