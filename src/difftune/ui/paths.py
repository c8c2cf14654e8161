"""Every file the web app reads or writes is inside one root folder."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from difftune.errors import DifftuneError


class OutsideRoot(DifftuneError):
    """A path that leaves the root (``..``, an absolute path elsewhere, a symlink pointing out)."""


class Root:
    """The folder the app serves; :meth:`resolve` turns a client's relative path into a safe absolute one."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder).expanduser().resolve()
        if not self.path.is_dir():
            raise DifftuneError(f"--root {folder}: not a folder")

    def resolve(self, rel: str | None, must_exist: bool = False) -> Path:
        """The absolute path of ``rel`` (relative to the root, ``/`` separators), symlinks resolved.

        Refused with :class:`OutsideRoot`: ``..`` parts, absolute paths, NUL bytes, and any path
        whose real location (after following symlinks) is not the root or inside it.
        """
        text = (rel or "").strip()
        if "\x00" in text or "\\" in text:
            raise OutsideRoot(f"{rel!r}: not a valid path")
        pure = PurePosixPath(text)
        if pure.is_absolute() or text.startswith("~") or ".." in pure.parts:
            raise OutsideRoot(f"{rel!r}: paths must be relative to the root folder, without '..'")
        target = (self.path / pure).resolve()
        if target != self.path and self.path not in target.parents:
            raise OutsideRoot(f"{rel!r}: points outside the root folder")
        if must_exist and not target.exists():
            raise DifftuneError(f"{rel}: no such file or folder")
        return target

    def contains(self, path: str | Path) -> bool:
        """True if ``path`` (absolute, or relative to the root) really lies inside the root."""
        p = Path(path).expanduser()
        real = (p if p.is_absolute() else self.path / p).resolve()
        return real == self.path or self.path in real.parents

    def rel(self, path: Path) -> str:
        """``path`` relative to the root, with ``/`` separators (``""`` for the root itself)."""
        rel = os.path.relpath(Path(path).resolve(), self.path)
        return "" if rel == "." else Path(rel).as_posix()
