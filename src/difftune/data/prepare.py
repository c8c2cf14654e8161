"""``difftune data prepare``: a clean copy of an image folder, ready to train on.

Orientation and colour mode fixed, centre-cropped square (or aspect kept), resized with LANCZOS,
written as PNG or high-quality JPEG, with a ``metadata.jsonl`` of captions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from difftune.config.resolve import parse_colour
from difftune.config.schema import DataConfig
from difftune.data.probe import Problem
from difftune.data.sources import scan
from difftune.data.transforms import open_rgb
from difftune.errors import DifftuneError
from difftune.fileio import atomic_write_text


@dataclass
class PrepareResult:
    written: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def resize_for_training(img: Image.Image, size: int, crop: str) -> Image.Image:
    """``crop="square"``: centre-crop to a square of ``size``; ``"keep"``: shorter side becomes ``size``."""
    w, h = img.size
    if crop == "square":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        target = (size, size)
    else:
        scale = size / min(w, h)
        target = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img if img.size == target else img.resize(target, Image.Resampling.LANCZOS)


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """The output is a new (or empty) folder apart from the source; a folder with files only with ``overwrite``."""
    if not src.is_dir():
        raise DifftuneError(f"{src}: not a folder of images")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise DifftuneError(f"{dst}: the output folder must be outside the source folder {src}")
    if dst.resolve() in src.resolve().parents:
        raise DifftuneError(f"{dst}: the output folder holds the source folder {src}; choose a new folder")
    if dst.exists() and not dst.is_dir():
        raise DifftuneError(f"{dst}: is a file, not a folder; choose a new folder for the prepared images")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise DifftuneError(f"{dst}: already holds files (its images and metadata.jsonl would be replaced); "
                            "choose a new folder, or give --overwrite")


def prepare_folder(src: str | Path, dst: str | Path, *, size: int = 512, crop: str = "square", fmt: str = "png",
                   caption: str | None = None, min_images: int = 5, background: str = "white",
                   quality: int = 95, overwrite: bool = False) -> PrepareResult:
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not 8 <= size <= 8192:
        raise DifftuneError(f"--size: {size} is not a size in pixels from 8 to 8192, e.g. 512")
    check_destination(src, dst, overwrite)
    cfg = DataConfig(path=str(src), instance_prompt=caption, background=background)
    found = scan(cfg, require_captions=False)
    result = PrepareResult(problems=found.problems)
    bg = parse_colour(background)
    suffix = ".png" if fmt == "png" else ".jpg"
    rows, used = [], set()
    dst.mkdir(parents=True, exist_ok=True)
    for ex in found.examples:
        rel = Path(ex.name).with_suffix(suffix)
        n = 1
        while rel.as_posix() in used:  # a.jpg and a.png would both become a.png
            rel = Path(ex.name).with_name(f"{Path(ex.name).stem}-{n}{suffix}")
            n += 1
        used.add(rel.as_posix())
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        img = resize_for_training(open_rgb(ex.image, bg), size, crop)
        if fmt == "png":
            img.save(out, format="PNG", optimize=True)
        else:
            img.save(out, format="JPEG", quality=quality, subsampling=0, optimize=True)
        result.written.append(out)
        rows.append(json.dumps({"file_name": rel.as_posix(), cfg.caption_column: ex.caption}, ensure_ascii=False))
    atomic_write_text(dst / "metadata.jsonl", "\n".join(rows) + ("\n" if rows else ""))
    if len(result.written) < min_images:
        result.warnings.append(f"only {len(result.written)} usable image(s); at least {min_images} are "
                               "recommended (--min-images)")
    if any(p.kind == "no caption" for p in found.problems) and not caption:
        result.warnings.append("some images have no caption; give --caption \"a photo of sks dog\" or add captions")
    return result
