"""Change one image's caption where difftune reads it from, atomically.

The caption lives where :mod:`difftune.data.sources` finds it: the image's line in
``metadata.jsonl`` (which wins), else the sidecar file beside the image (``cat.png`` →
``cat.txt``). A new caption goes to the metadata file if the folder has one, else to a new
sidecar. Other lines and other fields of the edited line are kept as they were.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path, PurePosixPath

from difftune.data.probe import IMAGE_SUFFIXES
from difftune.errors import DifftuneError
from difftune.fileio import atomic_write_text


def set_caption(folder: str | Path, name: str, caption: str, caption_column: str = "text",
                caption_extension: str = ".txt") -> Path:
    """Write ``caption`` for image ``name`` (relative to ``folder``); returns the file written."""
    root = Path(folder).resolve()
    pure = PurePosixPath(posixpath.normpath(name.replace("\\", "/")))
    image = (root / pure).resolve()
    if pure.is_absolute() or ".." in pure.parts or root not in image.parents:
        raise DifftuneError(f"{name}: not an image inside {folder}")
    if not image.is_file() or image.suffix.lower() not in IMAGE_SUFFIXES:
        raise DifftuneError(f"{name}: no such image in {folder}")
    if "\n" in caption or "\r" in caption:
        raise DifftuneError(f"{name}: a caption is one line")
    caption = caption.strip()
    meta = root / "metadata.jsonl"
    side = image.with_suffix(caption_extension)
    if meta.is_file():
        lines = _read_lines(meta)
        row_at = _line_of(lines, pure.as_posix())
        if row_at is not None:
            index, row = row_at
            row[caption_column] = caption
            lines[index] = json.dumps(row, ensure_ascii=False) + ("\n" if lines[index].endswith("\n") else "")
            atomic_write_text(meta, "".join(lines))
            return meta
        if not side.is_file():
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines.append(json.dumps({"file_name": pure.as_posix(), caption_column: caption}, ensure_ascii=False) + "\n")
            atomic_write_text(meta, "".join(lines))
            return meta
    atomic_write_text(side, caption + "\n")
    return side


def _read_lines(meta: Path) -> list[str]:
    try:
        return meta.read_text(encoding="utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        raise DifftuneError(f"{meta}: not UTF-8; fix its encoding before editing captions here") from None


def _line_of(lines: list[str], name: str) -> tuple[int, dict] | None:
    """(index, parsed row) of the metadata line for image ``name``, or None."""
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("file_name"), str) and \
                posixpath.normpath(row["file_name"].replace("\\", "/")) == name:
            return i, row
    return None
