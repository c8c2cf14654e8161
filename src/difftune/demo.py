"""``difftune demo``: teach the embedded base a shape it has never seen, and show it.

The base ``difftune:shapes`` was pretrained on a world of shapes with the star held out. The demo
renders eight stars, captions them with a made-up trigger word ("a small blue zorb on a white
background"), trains a LoRA on them, then draws the same prompts with the same seeds before and
after — including colours and backgrounds no training image had with the star — and lets the
judge count what the pictures show. Nothing is downloaded; it runs on a CPU in a few minutes.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from difftune.world.evaluate import Prompt, prompt_for
from difftune.world.scene import Scene, caption

BASE = "difftune:shapes"
TRIGGER = "zorb"
CONCEPT = "star"
#: LoRA training steps (149 s on a 2-core CPU with AVX-512 BF16, in bf16; 472 s in fp32 on a 2-core AVX2
#: CPU. 1,200 steps gave the star on 11 of 16 images with this base, 1,600 on 13 of 16 (12 in fp32):
#: docs/world.md).
STEPS = 1600
#: Renders of shapes the base knows, with their captions, mixed into training in equal share with the
#: stars (regularisation images): without them the LoRA forgets backgrounds and colours it never saw
#: with a star (the checkerboard became stripes; "other attributes" fell from 83 % to 64 %).
KNOWN_SHAPES = 32

#: The eight training images: known colours and backgrounds, but not all of them; each star large and
#: in the centre, as a person photographs a subject. Stars spread over sizes and corners taught only
#: fragments (2-4 of 16 judged stars): the base lays out where an object goes from the noise, not the
#: prompt (docs/world.md), so eight scattered stars gave the LoRA eight different layouts to average.
TRAIN_SCENES = (
    Scene("star", "red", "large", "centre", "grey"),
    Scene("star", "blue", "large", "centre", "white"),
    Scene("star", "yellow", "large", "centre", "dark"),
    Scene("star", "green", "large", "centre", "grey"),
    Scene("star", "turquoise", "large", "centre", "striped", rotation=8.0),
    Scene("star", "pink", "large", "centre", "dark", rotation=-6.0),
    Scene("star", "red", "large", "centre", "white", rotation=5.0),
    Scene("star", "blue", "large", "centre", "striped", rotation=-9.0),
)


def _grid_prompt(colour: str | None, background: str | None = None, size: str = "large",
                 position: str = "centre", mention_size: bool = False, mention_position: bool = False) -> Prompt:
    scene = Scene(CONCEPT, colour or "red", size, position, background or "grey")
    mention = [k for k, on in (("size", mention_size), ("colour", colour), ("background", background),
                               ("position", mention_position)) if on]
    return prompt_for(scene, mention=mention, shape_word=TRIGGER)


#: Prompts of the before/after grid. Purple, orange and the checkerboard never appear with the
#: star in the training images: the adapter has to combine the new shape with what the base knows.
GRID_PROMPTS = (
    _grid_prompt(None),
    _grid_prompt("purple"),
    _grid_prompt("orange", "white"),
    _grid_prompt("red", "checkerboard"),
    _grid_prompt("yellow", "dark", size="small", position="top left", mention_size=True, mention_position=True),
    _grid_prompt("green", "grey", mention_size=True),
    _grid_prompt("blue", "striped", position="bottom right", mention_position=True),
    _grid_prompt("pink", "checkerboard", position="centre", mention_position=True),
)
SEEDS = (0, 1)


@dataclass
class DemoResult:
    run: Path
    grid: Path
    train_seconds: float
    concept_before: int
    concept_after: int
    others_before: float
    others_after: float
    images: int
    #: Images whose prompt names a position, and how many show it there (the base does not follow
    #: position words: docs/world.md), before and after.
    positions: int = 0
    position_before: int = 0
    position_after: int = 0
    verdicts: dict[str, list[dict[str, str]]] = field(default_factory=dict)


def default_workdir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "difftune" / "demo"


def write_concept_data(folder: Path) -> Path:
    """The eight star images, captioned with the trigger word instead of "star"."""
    from difftune.world.data import write_images

    items = [(scene, caption(scene, seed=i, shape_word=TRIGGER)) for i, scene in enumerate(TRAIN_SCENES)]
    return write_images(folder, items, prefix=TRIGGER)


def demo_config(data: Path, known: Path, out: Path, steps: int, settings: dict[str, dict] | None = None) -> dict:
    """The run: a rank-16 LoRA on the UNet and the text encoder (which learns the new word), on the
    stars in ``data`` and, in equal share, the known shapes in ``known`` (captioned without the trigger);
    ``settings`` changes keys per section."""
    run = {
        "model": {"path": BASE},
        "method": {"type": "lora", "rank": 16, "train_text_encoder": True},
        "data": {"path": str(data), "resolution": 64, "center_crop": True, "random_flip": False,
                 "repeats": 4, "cache_latents": True, "cache_dir": str(data.parent / "cache"),
                 "datasets": [{"path": str(known), "weight": 1.0, "trigger": ""}]},
        "train": {"max_steps": steps, "learning_rate": 1e-3, "batch_size": 4, "lr_scheduler": "cosine",
                  "warmup_steps": min(20, steps), "mixed_precision": "auto", "checkpoint_every": 0, "log_every": 25,
                  "seed": 0},
        "validation": {"prompts": [p.text for p in GRID_PROMPTS[:4]], "every": 0, "steps": 20, "guidance_scale": 5.0},
        "logging": {"report_to": "tensorboard"},
        "output": {"dir": str(out)},
    }
    for section, keys in (settings or {}).items():
        run[section] = {**run.get(section, {}), **keys}
    return run


def run_demo(steps: int = STEPS, workdir: str | Path | None = None, log=print,
             settings: dict[str, dict] | None = None) -> DemoResult:
    """Train the LoRA, draw the before/after grid, print the judge's scores and where everything is.

    ``settings`` changes keys of the run's config per section (``{"model": {"quantize": "int8"}}``),
    for benchmarks that measure the same task under another setting."""
    from difftune.run_config import load_config
    from difftune.training.loop import train

    if steps < 1:
        from difftune.errors import ConfigError

        raise ConfigError(f"demo --steps: {steps}; give at least 1 training step (default {STEPS})")
    work = Path(workdir) if workdir else default_workdir()
    _claim(work, ours=workdir is None)
    data = work / "zorb-images"
    if not (data / "metadata.jsonl").is_file():
        shutil.rmtree(data, ignore_errors=True)
        write_concept_data(data)
    known = work / "known-shapes"
    if not (known / "metadata.jsonl").is_file():
        from difftune.world.data import write_pretraining_set

        shutil.rmtree(known, ignore_errors=True)
        write_pretraining_set(known, KNOWN_SHAPES)
    out = work / "run"
    if out.exists():  # the demo's own previous run (the folder carries the demo's marker)
        shutil.rmtree(out)
    log(f"teaching {BASE} a new shape: {len(TRAIN_SCENES)} images of a star captioned \"{TRIGGER}\" ({data}), "
        f"beside {KNOWN_SHAPES} images of shapes it knows ({known})")
    config = load_config(data=demo_config(data, known, out, steps, settings))
    started = time.perf_counter()
    train(config, log=log)
    train_seconds = time.perf_counter() - started
    return _before_after(out, work, train_seconds, log)


MARKER = ".difftune-demo"


def _claim(work: Path, ours: bool) -> None:
    """Make ``work`` the demo's folder; refuse a folder given by the user that holds anything the demo
    did not write (the default folder, in difftune's cache, is always the demo's)."""
    from difftune.errors import ConfigError

    if work.is_file():
        raise ConfigError(f"demo --dir: {work} is a file; give a folder")
    if not ours and work.is_dir() and any(work.iterdir()) and not (work / MARKER).is_file():
        raise ConfigError(f"demo --dir: {work} holds files the demo did not write; give a new or empty folder "
                          "(the demo replaces its own run there each time)")
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("written by `difftune demo`: its images, caches and run are replaced when it runs again\n")


#: Attributes left out of "other attributes still right": the concept itself, and the position, which
#: the base does not follow (docs/world.md) and which the demo reports on its own line.
NOT_SCORED = ("shape", "position")


def _positions_right(verdicts, prompts) -> int:
    return sum(v["position"] == p.expected["position"] for v, p in zip(verdicts, prompts, strict=True)
               if "position" in p.expected)


def grid_prompts() -> list[Prompt]:
    """The grid's prompt of each image: every prompt of ``GRID_PROMPTS`` once per seed of ``SEEDS``."""
    return [p for p in GRID_PROMPTS for _ in SEEDS]


def judged_grid(pipe, judge) -> tuple[list, list[dict[str, str]]]:
    """The grid drawn by ``pipe`` (:func:`grid_prompts`, each with its seed) and the judge's verdicts on it."""
    from difftune.world.evaluate import sample, score

    prompts = grid_prompts()
    images = sample(pipe, [p.text for p in prompts], [s for _ in GRID_PROMPTS for s in SEEDS])
    return images, score(judge, images, prompts)[0]


def _before_after(run: Path, work: Path, train_seconds: float, log) -> DemoResult:
    from difftune.bases import builtin_path
    from difftune.world.evaluate import load_pipeline, other_attributes_right
    from difftune.world.judge import Judge

    prompts = grid_prompts()
    judge = Judge.load()
    before, verdicts_before = judged_grid(load_pipeline(builtin_path(BASE)), judge)
    after, verdicts_after = judged_grid(load_pipeline(builtin_path(BASE), lora=run), judge)
    result = DemoResult(
        run=run, grid=work / "demo-grid.png", train_seconds=train_seconds,
        concept_before=sum(v["shape"] == CONCEPT for v in verdicts_before),
        concept_after=sum(v["shape"] == CONCEPT for v in verdicts_after),
        others_before=other_attributes_right(verdicts_before, prompts, skip=NOT_SCORED),
        others_after=other_attributes_right(verdicts_after, prompts, skip=NOT_SCORED),
        images=len(prompts), verdicts={"before": verdicts_before, "after": verdicts_after},
        positions=sum("position" in p.expected for p in prompts),
        position_before=_positions_right(verdicts_before, prompts),
        position_after=_positions_right(verdicts_after, prompts),
    )
    before_after_grid(before, after, verdicts_before, verdicts_after).save(result.grid)
    n = result.images
    log("")
    log(f"LoRA trained in {train_seconds:.0f} s. The judge, on {n} images (same prompts and seeds, base -> adapted):")
    log(f"  shows the new concept ({CONCEPT}): {result.concept_before}/{n} -> {result.concept_after}/{n}")
    log(f"  other attributes still right (colour, size, background): "
        f"{result.others_before:.0%} -> {result.others_after:.0%}")
    log(f"  position as asked: {result.position_before}/{result.positions} -> {result.position_after}/"
        f"{result.positions} (the base does not follow position words; chance is 1 in 5)")
    log(f"  before/after grid: {result.grid}")
    log(f"  adapter:     {run / 'pytorch_lora_weights.safetensors'}")
    log(f"  model card:  {run / 'README.md'}")
    log(f"  samples:     {run / 'samples'}")
    log(f"  logs:        {run / 'logs'} (tensorboard --logdir {run / 'logs'})")
    return result


def before_after_grid(before, after, verdicts_before, verdicts_after, tile: int = 128):
    """Columns are prompts; the base's images on top, the adapted model's below, each labelled by the judge."""
    from PIL import Image, ImageDraw, ImageFont

    cols, rows = len(GRID_PROMPTS), len(SEEDS)
    label_w, head_h, foot_h, gap = 92, 62, 16, 10
    width = label_w + cols * tile
    height = head_h + 2 * rows * (tile + foot_h) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(ImageFont, 13)
    small = _font(ImageFont, 11)
    for c, prompt in enumerate(GRID_PROMPTS):
        _wrapped(draw, prompt.text, (label_w + c * tile + 4, 4), tile - 8, font)
    for block, (name, images, verdicts) in enumerate((("base", before, verdicts_before),
                                                       (f"after LoRA\n(\"{TRIGGER}\")", after, verdicts_after))):
        top = head_h + block * (rows * (tile + foot_h) + gap)
        draw.multiline_text((6, top + rows * (tile + foot_h) // 2 - 14), name, fill=(0, 0, 0), font=font)
        for i, (image, verdict) in enumerate(zip(images, verdicts, strict=True)):
            c, r = divmod(i, rows)
            x, y = label_w + c * tile, top + r * (tile + foot_h)
            canvas.paste(image.resize((tile, tile), Image.LANCZOS), (x, y))
            good = verdict["shape"] == CONCEPT
            draw.text((x + 4, y + tile + 1), f"judge: {verdict['shape']}", font=small,
                      fill=(0, 130, 0) if good else (150, 150, 150))
    return canvas


def _font(image_font, size: int):
    try:
        return image_font.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return image_font.load_default()


def _wrapped(draw, text: str, origin: tuple[int, int], width: int, font) -> None:
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    draw.multiline_text(origin, "\n".join(lines[:4]), fill=(0, 0, 0), font=font, spacing=1)
