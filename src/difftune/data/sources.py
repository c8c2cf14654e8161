"""Find training examples: image folders (``metadata.jsonl`` or ``.txt`` captions) or HF datasets.

:func:`scan` never raises for a bad file: it returns the usable examples and a list of
problems, each naming the file and the reason. :func:`load_examples` applies
``data.on_bad_file`` to that list.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from difftune.config.resolve import ResolvedDataset, resolve_datasets
from difftune.config.schema import DataConfig
from difftune.data.probe import (
    IMAGE_SUFFIXES,
    ImageInfo,
    Problem,
    non_image_reason,
    probe_image,
    read_text_file,
)
from difftune.errors import ConfigError, DifftuneError

__all__ = ["IMAGE_SUFFIXES", "Example", "Problem", "ScanResult", "load_examples", "scan"]


@dataclass
class Example:
    """One training example. ``image`` is a path, or an in-memory PIL image from a dataset."""

    image: Any
    caption: str
    name: str
    size: tuple[int, int] | None = None  # (height, width), upright
    digest: str = ""  # sha256 of the image file's bytes (of the pixels for in-memory images)
    trigger: str = ""
    dataset: int = 0


@dataclass
class ScanResult:
    """Usable examples (in dataset order) and every problem found."""

    examples: list[Example]
    problems: list[Problem]
    datasets: list[ResolvedDataset] = field(default_factory=list)

    @property
    def skipped(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "skipped"]

    def skipped_summary(self) -> str:
        """E.g. ``3 skipped: 2 corrupt image, 1 not an image``, or ``none skipped``."""
        counts = Counter(p.kind for p in self.skipped)
        if not counts:
            return "none skipped"
        parts = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
        return f"{sum(counts.values())} skipped: {parts}"

    def groups(self) -> list[list[int]]:
        """Example indices of each dataset."""
        out: list[list[int]] = [[] for _ in self.datasets]
        for i, ex in enumerate(self.examples):
            out[ex.dataset].append(i)
        return out


def scan(cfg: DataConfig, require_captions: bool = True) -> ScanResult:
    """Every dataset of ``cfg`` scanned; ``require_captions=False`` keeps uncaptioned images (caption "")."""
    examples: list[Example] = []
    problems: list[Problem] = []
    specs = resolve_datasets(cfg)
    for spec in specs:
        path = Path(spec.path).expanduser()
        if path.is_dir() and not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            found, probs = _folder_examples(path, cfg, spec, require_captions)
        else:
            found, probs = _dataset_examples(cfg, spec, require_captions)
        examples += found
        problems += probs
    return ScanResult(examples, problems, specs)


def load_examples(cfg: DataConfig, log=None) -> ScanResult:
    """Scan, then apply ``data.on_bad_file``: skip with each reason logged, or stop with the list."""
    result = scan(cfg)
    skipped = result.skipped
    if skipped and cfg.on_bad_file == "error":
        listing = "\n".join(f"  {p.line}" for p in skipped)
        raise DifftuneError(
            f"{len(skipped)} file(s) cannot be used and data.on_bad_file = \"error\":\n{listing}\n"
            "Fix or remove them, or set data.on_bad_file = \"skip\". `difftune data check` lists every problem."
        )
    if log is not None:
        for p in skipped:
            log(f"skipping {p.line}")
        for p in result.problems:
            if p.severity == "warning":
                log(f"warning: {p.line}")
    if not result.examples:
        where = ", ".join(d.path for d in result.datasets)
        raise DifftuneError(f"data.path: no usable images in {where} ({result.skipped_summary()}); "
                            "run `difftune data check` for the reasons")
    return result


def _caption(raw: str | None, spec: ResolvedDataset, name: str, require: bool) -> tuple[str | None, Problem | None]:
    """The caption for one image, or a problem saying why it has none."""
    if spec.caption_source == "instance_prompt":
        return spec.instance_prompt or "", None
    if raw is not None and raw.strip():
        return raw.strip(), None
    empty = raw is not None
    what = "caption is empty" if empty else "no caption"
    if spec.caption_source == "captions":
        return None, Problem(name, "empty caption" if empty else "no caption",
                             f"{what}, and data.caption_source = \"captions\" requires one")
    if spec.instance_prompt:
        return spec.instance_prompt, Problem(name, "empty caption" if empty else "no caption",
                                             f"{what}; using instance_prompt", "warning" if empty else "note")
    if not require:
        return "", Problem(name, "empty caption" if empty else "no caption", what, "warning")
    return None, Problem(name, "empty caption" if empty else "no caption",
                         f"{what}. Add it to metadata.jsonl or a caption file beside the image, or set "
                         "data.instance_prompt")


def _read_metadata(root: Path, cfg: DataConfig, problems: list[Problem]) -> dict[str, str | None]:
    """Captions from ``metadata.jsonl`` by normalised relative path; bad lines become problems."""
    meta = root / "metadata.jsonl"
    captions: dict[str, str | None] = {}
    if not meta.is_file():
        return captions
    text, note, severity = read_text_file(meta)
    if note:
        problems.append(Problem(str(meta), "metadata encoding", note, severity))
    resolved_root = root.resolve()
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{meta}:{lineno}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(where, "malformed metadata", f"not valid JSON ({exc.msg}); line ignored"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            problems.append(Problem(where, "malformed metadata", "no \"file_name\" string; line ignored"))
            continue
        file_name = row["file_name"]
        norm = posixpath.normpath(file_name.replace("\\", "/"))
        pure = PurePosixPath(norm)
        target = (root / norm).resolve()
        if pure.is_absolute() or ".." in pure.parts or Path(file_name).is_absolute() or (
                resolved_root not in target.parents and target != resolved_root):
            problems.append(Problem(where, "unsafe path", f"file_name {file_name!r} points outside the data "
                                    "folder; refused as unsafe"))
            continue
        if not target.is_file():
            problems.append(Problem(where, "missing file", f"file_name {file_name!r} does not exist"))
            continue
        value = row.get(cfg.caption_column)
        if value is not None and not isinstance(value, str):
            problems.append(Problem(where, "malformed metadata", f"{cfg.caption_column!r} is not a string; ignored",
                                    "warning"))
            value = None
        captions[norm] = value
    return captions


def _folder_examples(root: Path, cfg: DataConfig, spec: ResolvedDataset,
                     require: bool) -> tuple[list[Example], list[Problem]]:
    problems: list[Problem] = []
    captions = _read_metadata(root, cfg, problems)
    files, hidden_dirs = [], []
    for p in sorted(root.rglob("*")):
        rel_parts = p.relative_to(root).parts
        if any(part.startswith(".") and part not in (".DS_Store",) for part in rel_parts[:-1]):
            continue
        if p.is_dir():
            if p.name.startswith("."):
                hidden_dirs.append(p)
            continue
        files.append(p)
    for d in hidden_dirs:
        problems.append(Problem(str(d), "hidden folder", "not read (names starting with '.' are skipped)"))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    stems = {p.with_suffix("") for p in images}
    sidecar_ext = cfg.caption_extension.lower()
    examples = []
    for p in files:
        if p.suffix.lower() in IMAGE_SUFFIXES or p == root / "metadata.jsonl":
            continue
        if p.suffix.lower() == sidecar_ext and p.with_suffix("") in stems:
            continue
        if p.suffix.lower() == sidecar_ext or p.suffix.lower() == ".txt":
            problems.append(Problem(str(p), "not an image", "text file with no image of the same name"))
        else:
            problems.append(Problem(str(p), "not an image", non_image_reason(p)))
    for img in images:
        info = probe_image(img, min_size=cfg.min_size, max_pixels=cfg.max_pixels)
        if isinstance(info, Problem):
            problems.append(info)
            continue
        problems += [Problem(str(img), "converted", note, "note") for note in info.notes]
        rel = img.relative_to(root).as_posix()
        raw = captions.get(rel)
        side = img.with_suffix(cfg.caption_extension)
        if raw is None and side.is_file():
            raw, note, severity = read_text_file(side)
            if note:
                problems.append(Problem(str(side), "caption encoding", note, severity))
        caption, problem = _caption(raw, spec, str(img), require)
        if problem:
            problems.append(problem)
        if caption is None:
            continue
        examples.append(_example(img, caption, rel, info, spec))
    return examples, problems


def _example(image: Any, caption: str, name: str, info: ImageInfo, spec: ResolvedDataset) -> Example:
    return Example(image, caption, name, info.size, info.digest, spec.trigger, spec.index)


def _dataset_examples(cfg: DataConfig, spec: ResolvedDataset,
                      require: bool) -> tuple[list[Example], list[Problem]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"data.path: {spec.path} is not an image folder; reading datasets needs the extra: "
            "pip install 'difftune[datasets]'"
        ) from None
    path = Path(spec.path).expanduser()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(spec.path)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types
        raise DifftuneError(f"data.path: could not load dataset {spec.path} ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DifftuneError(f"data.path: dataset {spec.path} has no \"train\" split (has {', '.join(ds)})")
        ds = ds["train"]
    columns = ds.column_names
    if cfg.image_column not in columns:
        raise ConfigError(f"data.image_column: {cfg.image_column!r} is not a column of {spec.path} ({', '.join(columns)})")
    has_caption = cfg.caption_column in columns
    if not has_caption and spec.caption_source != "instance_prompt" and not spec.instance_prompt:
        raise ConfigError(
            f"data.caption_column: {cfg.caption_column!r} is not a column of {spec.path} ({', '.join(columns)})"
        )
    from difftune.data.probe import describe_mode

    out, problems = [], []
    for i, row in enumerate(ds):
        name = f"{spec.path}[{i}]"
        img = row[cfg.image_column]
        w, h = img.size
        if w * h > cfg.max_pixels:
            problems.append(Problem(name, "too large", f"{w}x{h} is above data.max_pixels ({cfg.max_pixels:,})"))
            continue
        if min(w, h) < cfg.min_size:
            problems.append(Problem(name, "too small", f"{w}x{h} is below data.min_size ({cfg.min_size} px)"))
            continue
        notes = describe_mode(img)
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
        problems += [Problem(name, "converted", n, "note") for n in notes]
        caption, problem = _caption(row.get(cfg.caption_column), spec, name, require)
        if problem:
            problems.append(problem)
        if caption is None:
            continue
        digest = hashlib.sha256(img.tobytes() + repr((img.mode, img.size)).encode()).hexdigest()
        out.append(_example(img, caption, name, ImageInfo((h, w), digest), spec))
    return out, problems
