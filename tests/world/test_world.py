"""The closed world: deterministic renders, captions that say what the image shows, held-out concepts
kept out of pretraining, and docs/world.md generated from the grammar."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from difftune.world import grammar as g
from difftune.world.data import pretraining_items, read_scenes
from difftune.world.render import BACKGROUND_COLOURS, render
from difftune.world.scene import EVERYTHING, PRETRAINING, Scene, caption

ROOT = Path(__file__).resolve().parents[2]


def test_render_is_deterministic_and_draws_the_scene():
    scene = Scene("square", "blue", "large", "centre", "white")
    a, b = render(scene), render(scene)
    assert a.size == (64, 64) and render(scene, 128).size == (128, 128)
    assert a.tobytes() == b.tobytes()
    pixels = np.asarray(a).astype(int)
    assert tuple(pixels[32, 32]) == g.COLOURS["blue"]          # the shape's middle
    assert tuple(pixels[1, 1]) == BACKGROUND_COLOURS["white"]   # a corner: background
    outline = np.asarray(render(scene.with_(style="outline"))).astype(int)
    assert tuple(outline[32, 32]) == BACKGROUND_COLOURS["white"]  # outline: the middle is empty


def test_position_and_size_move_and_scale_the_shape():
    def mask(scene):
        return np.abs(np.asarray(render(scene)).astype(int) - BACKGROUND_COLOURS["grey"]).sum(-1) > 60

    small_tl = mask(Scene("circle", "red", "small", "top left", "grey"))
    large_br = mask(Scene("circle", "red", "large", "bottom right", "grey"))
    ys, xs = np.nonzero(small_tl)
    assert xs.mean() < 24 and ys.mean() < 24
    ys, xs = np.nonzero(large_br)
    assert xs.mean() > 40 and ys.mean() > 40
    assert large_br.sum() > 2.5 * small_tl.sum()


def test_scenes_and_captions_follow_from_the_seed():
    assert Scene.from_seed(3) == Scene.from_seed(3)
    assert caption(Scene.from_seed(3), 3) == caption(Scene.from_seed(3), 3)
    assert len({Scene.from_seed(s) for s in range(50)}) == 50


def test_a_full_caption_names_every_attribute():
    scene = Scene("hexagon", "orange", "small", "top right", "checkerboard", style="outline")
    assert caption(scene, full=True) == (
        "an outline drawing of a small orange hexagon on a checkerboard background, top right")
    assert caption(scene.with_(style="filled"), full=True, shape_word="zorb").startswith("a small orange zorb ")


def test_captions_say_only_what_the_image_shows():
    rng = random.Random(0)
    for _ in range(300):
        scene = EVERYTHING.sample(rng)
        text = caption(scene, rng=rng)
        assert scene.shape in text
        others = [s for s in g.ALL_SHAPES if s != scene.shape] + [c for c in g.ALL_COLOURS if c != scene.colour]
        assert not any(f" {word}" in f" {text}" for word in others), text


def test_bad_attribute_values_are_refused():
    with pytest.raises(ValueError, match="shape: 'blob'"):
        Scene(shape="blob")


def test_pretraining_never_shows_a_held_out_concept_or_pair():
    held_words = g.HELD_OUT.words()
    for scene, text in pretraining_items(3000, seed=0):
        assert PRETRAINING.allows(scene)
        assert scene.shape not in g.HELD_OUT_SHAPES and scene.colour not in g.HELD_OUT_COLOURS
        assert scene.style not in g.HELD_OUT_STYLES
        assert (scene.shape, scene.colour) not in g.held_out_pairs()
        assert not any(word in text for word in held_words), text
    # every known shape, colour, size, position and background is there
    scenes = [s for s, _ in pretraining_items(3000, seed=0)]
    for name in ("shape", "colour", "size", "position", "background"):
        assert {getattr(s, name) for s in scenes} == set(getattr(PRETRAINING, name + "s"))


def test_the_pretraining_data_command_writes_only_pretraining_scenes(tmp_path):
    """The command in configs/shapes-pretrain.toml's header, at a small n."""
    config = (ROOT / "configs" / "shapes-pretrain.toml").read_text()
    assert "python -m difftune.world data work/shapes/data" in config
    out = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "difftune.world", "data", str(out), "--n", "40"], check=True,
                   capture_output=True)
    rows = read_scenes(out)
    assert len(rows) == 40 and all((out / name).is_file() for name, _, _ in rows)
    assert [(s, t) for _, t, s in rows] == [(s, t) for s, t in pretraining_items(40, seed=0)]
    assert all(PRETRAINING.allows(scene) for _, _, scene in rows)
    first = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert set(first) == {"file_name", "text", "scene"}
    again = subprocess.run([sys.executable, "-m", "difftune.world", "data", str(out), "--n", "40"],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr  # never writes over a folder


def test_world_doc_grammar_is_current():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (ROOT / "docs" / "world.md").read_text()
    assert module.render(current, module.world_sections(), "world.md") == current, \
        "docs/world.md is stale; regenerate it with: python scripts/update_readme.py"


def test_training_and_models_never_import_the_world():
    for package in ("training", "models"):
        for path in (ROOT / "src" / "difftune" / package).rglob("*.py"):
            text = path.read_text()
            assert "difftune.world" not in text and "from difftune import world" not in text, path
