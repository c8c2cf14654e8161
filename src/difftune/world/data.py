"""Write world images as a difftune dataset folder: PNGs and a ``metadata.jsonl`` of captions.

The pretraining set is a pure function of ``(n, seed)``; it never contains a held-out concept or
a held-out shape/colour pair (the scenes come from :data:`~difftune.world.scene.PRETRAINING`).
Each line of ``metadata.jsonl`` also records the scene, so tools can check what an image shows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

from difftune.world.render import render
from difftune.world.scene import PRETRAINING, Pool, Scene, caption

METADATA = "metadata.jsonl"


def write_images(folder: str | Path, items: Iterable[tuple[Scene, str]], size: int = 64,
                 prefix: str = "img") -> Path:
    """Render ``(scene, caption)`` pairs into ``folder`` (which must be empty or absent)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder}: not empty; give a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (scene, text) in enumerate(items):
        name = f"{prefix}_{i:06d}.png"
        render(scene, size).save(folder / name, optimize=False, compress_level=1)
        lines.append(json.dumps({"file_name": name, "text": text, "scene": scene.as_dict()}))
    (folder / METADATA).write_text("\n".join(lines) + "\n")
    return folder


def pretraining_items(n: int, seed: int = 0, pool: Pool = PRETRAINING) -> list[tuple[Scene, str]]:
    """The ``n`` scenes and captions of the pretraining set of ``seed``."""
    rng = random.Random(f"pretraining/{seed}")
    items = []
    for _ in range(n):
        scene = pool.sample(rng)
        items.append((scene, caption(scene, rng=rng)))
    return items


def write_pretraining_set(folder: str | Path, n: int, seed: int = 0, size: int = 64) -> Path:
    return write_images(folder, pretraining_items(n, seed), size)


def read_scenes(folder: str | Path) -> list[tuple[str, str, Scene]]:
    """``(file name, caption, scene)`` for every line of a folder written here."""
    out = []
    for line in (Path(folder) / METADATA).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.append((row["file_name"], row["text"], Scene(**row["scene"])))
    return out
