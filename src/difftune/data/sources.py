"""Find training examples: an image folder (``metadata.jsonl`` or ``.txt`` captions) or a HF dataset."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.config.schema import DataConfig
from difftune.errors import ConfigError, DifftuneError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Example:
    """One training example. ``image`` is a path, or an in-memory PIL image from a dataset."""

    image: Any
    caption: str
    name: str


def load_examples(cfg: DataConfig) -> list[Example]:
    path = Path(cfg.path).expanduser()
    if path.is_dir() and not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
        examples = _folder_examples(path, cfg)
    else:
        examples = _dataset_examples(cfg)
    if not examples:
        raise DifftuneError(f"data.path: no images found in {cfg.path}")
    return examples


def _caption(raw: str | None, cfg: DataConfig, name: str) -> str:
    mode = cfg.caption_source
    if mode == "instance_prompt":
        return cfg.instance_prompt or ""
    if raw is not None and raw.strip():
        return raw.strip()
    if mode == "captions":
        raise DifftuneError(f"{name}: no caption, and data.caption_source = \"captions\" requires one")
    if cfg.instance_prompt:
        return cfg.instance_prompt
    raise DifftuneError(
        f"{name}: no caption. Add it to metadata.jsonl or a {cfg.caption_extension} file beside the "
        "image, or set data.instance_prompt"
    )


def _folder_examples(root: Path, cfg: DataConfig) -> list[Example]:
    captions: dict[str, str] = {}
    meta = root / "metadata.jsonl"
    if meta.is_file():
        for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DifftuneError(f"{meta}:{lineno}: not valid JSON ({exc.msg})") from None
            if "file_name" not in row:
                raise DifftuneError(f"{meta}:{lineno}: no \"file_name\" key")
            if cfg.caption_column not in row and cfg.caption_source == "captions":
                raise DifftuneError(f"{meta}:{lineno}: no {cfg.caption_column!r} key (data.caption_column)")
            captions[str(row["file_name"])] = row.get(cfg.caption_column)
    examples = []
    for img in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        rel = img.relative_to(root).as_posix()
        raw = captions.get(rel)
        side = img.with_suffix(cfg.caption_extension)
        if raw is None and side.is_file():
            raw = side.read_text(encoding="utf-8", errors="replace")
        examples.append(Example(img, _caption(raw, cfg, str(img)), rel))
    return examples


def _dataset_examples(cfg: DataConfig) -> list[Example]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"data.path: {cfg.path} is not an image folder; reading datasets needs the extra: "
            "pip install 'difftune[datasets]'"
        ) from None
    path = Path(cfg.path).expanduser()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(cfg.path)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types
        raise DifftuneError(f"data.path: could not load dataset {cfg.path} ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DifftuneError(f"data.path: dataset {cfg.path} has no \"train\" split (has {', '.join(ds)})")
        ds = ds["train"]
    columns = ds.column_names
    if cfg.image_column not in columns:
        raise ConfigError(f"data.image_column: {cfg.image_column!r} is not a column of {cfg.path} ({', '.join(columns)})")
    has_caption = cfg.caption_column in columns
    if not has_caption and cfg.caption_source != "instance_prompt" and not cfg.instance_prompt:
        raise ConfigError(
            f"data.caption_column: {cfg.caption_column!r} is not a column of {cfg.path} ({', '.join(columns)})"
        )
    out = []
    for i, row in enumerate(ds):
        name = f"{cfg.path}[{i}]"
        out.append(Example(row[cfg.image_column], _caption(row.get(cfg.caption_column), cfg, name), name))
    return out
