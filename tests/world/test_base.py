"""The embedded base difftune:shapes: its files match the published hashes, diffusers alone loads it
and draws what the prompt says, it resolves through the normal loading path, and the pretraining
config in the repo runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from difftune.bases import builtin_path
from difftune.errors import DifftuneError
from difftune.world.base import file_hashes, read_manifest

ROOT = Path(__file__).resolve().parents[2]
MAX_BYTES = 25 * 10**6


def test_shipped_files_match_the_published_hashes():
    folder = builtin_path("shapes")
    manifest = read_manifest(folder)
    assert manifest == file_hashes(folder), "a shipped file changed, or one is missing from SHA256SUMS"
    weights = [name for name in manifest if name.endswith(".safetensors")]
    assert {n.split("/")[0] for n in weights} == {"unet", "text_encoder", "vae"}
    assert sum((folder / n).stat().st_size for n in weights) <= MAX_BYTES
    readme = (ROOT / "README.md").read_text()
    for name in weights:
        assert f"{manifest[name]}  {name}" in readme, f"README does not publish the sha256 of {name}"


def test_built_in_names_resolve_and_unknown_ones_are_one_clear_line(tmp_path):
    from difftune import load_config
    from difftune.models.loading import resolve_source

    source = resolve_source("difftune:shapes")
    assert source.kind == "folder" and Path(source.path) == builtin_path("shapes")
    assert source.pipeline_class_name == "StableDiffusionPipeline"
    data = tmp_path / "data"
    data.mkdir()
    config = load_config(data={"model": {"path": "difftune:shapes"}, "data": {"path": str(data)}})
    assert config.model.path == "difftune:shapes"
    with pytest.raises(DifftuneError, match="'difftune:shape' is not a built-in base .built-in: difftune:shapes"):
        load_config(data={"model": {"path": "difftune:shape"}, "data": {"path": str(data)}})


DIFFUSERS_ONLY = """
import sys
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
generators = [torch.Generator().manual_seed(i) for i in range(8)]
out = pipe(["a red circle"] * 8, num_inference_steps=20, guidance_scale=5.0, generator=generators)
for i, image in enumerate(out.images):
    image.save(f"{sys.argv[2]}/{i}.png")
loaded = sorted(m for m in sys.modules if m == "difftune" or m.startswith("difftune."))
print("difftune modules:", loaded)
"""


def test_diffusers_alone_loads_the_base_and_draws_a_red_circle(tmp_path):
    from PIL import Image

    from difftune.world.judge import Judge

    proc = subprocess.run([sys.executable, "-c", DIFFUSERS_ONLY, str(builtin_path("shapes")), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "difftune modules: []" in proc.stdout
    images = [Image.open(tmp_path / f"{i}.png") for i in range(8)]
    assert all(im.size == (64, 64) for im in images)
    verdicts = Judge.load()(images)
    # Measured with the shipped base: a red circle on 7 of 8 seeds (the eighth a small orange circle);
    # shape and colour right on 95 % of unseen pairs (docs/world.md). One image of margin.
    red_circles = sum(v["colour"] == "red" and v["shape"] == "circle" for v in verdicts)
    assert red_circles >= 6, verdicts


def test_the_pretraining_config_runs_a_few_steps(tmp_path):
    """configs/shapes-pretrain.toml from a random-initialised folder, as the README's recipe builds it."""
    from diffusers import StableDiffusionPipeline

    from difftune.cli import main
    from difftune.world.base import build_init
    from difftune.world.data import write_pretraining_set

    data = write_pretraining_set(tmp_path / "data", 12)
    init = build_init(tmp_path / "init", vae=builtin_path("shapes") / "vae")
    out = tmp_path / "run"
    sets = [f"model.path={init}", f"data.path={data}", f"output.dir={out}", "train.max_steps=2",
            "train.batch_size=4", "train.warmup_steps=1", "validation.steps=2", "logging.report_to=none"]
    assert main(["train", str(ROOT / "configs" / "shapes-pretrain.toml"), *(a for s in sets for a in ("--set", s))]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe.unet.config.block_out_channels == StableDiffusionPipeline.from_pretrained(
        builtin_path("shapes")).unet.config.block_out_channels
    assert (out / "samples").is_dir()


def test_the_autoencoder_command_refuses_a_codec_that_changes_colours(tmp_path):
    """The `vae` command judges each world colour's encode/decode round trip and stops with a clear
    error, not a finished-looking folder, when a colour does not survive (an earlier codec drew red
    as orange, and the base pretrained on it drew red wrong)."""
    from diffusers import AutoencoderKL

    from difftune.world.autoencoder import COLOUR_CHECK_N, colour_round_trips

    result = subprocess.run(
        [sys.executable, "-c", "import sys; from difftune.world.__main__ import main; "
         "from difftune.world import autoencoder as a; "
         "import functools; a.train_autoencoder = functools.partial(a.train_autoencoder, pool_size=16); "
         "sys.argv = ['x', 'vae', sys.argv[1], '--steps', '2']; main()", str(tmp_path / "vae")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "changes colours" in result.stderr and "survives" in result.stderr and "--steps" in result.stderr
    # The check itself: a codec that keeps colours passes it on every colour the judge knows.
    kept = colour_round_trips(AutoencoderKL.from_pretrained(builtin_path("shapes") / "vae"), n=COLOUR_CHECK_N)
    assert set(kept) >= {"red", "orange", "brown"} and kept["red"] == COLOUR_CHECK_N
