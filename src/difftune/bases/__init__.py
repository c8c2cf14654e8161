"""Base models shipped inside difftune, named ``difftune:<name>`` in ``model.path``.

``difftune:shapes`` is a small Stable Diffusion 1.x model pretrained on the closed world of
:mod:`difftune.world` (docs/world.md). Each base is a plain diffusers folder in this package;
:func:`builtin_path` turns a built-in name into that folder, and from there a run loads it like
any other local model.
"""

from __future__ import annotations

from pathlib import Path

from difftune.config.rules import BUILTIN_PREFIX

PREFIX = BUILTIN_PREFIX
BASES_DIR = Path(__file__).resolve().parent
#: Built-in name -> folder name in this package.
BUILTIN = {"shapes": "shapes"}


def is_builtin(path: str) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def builtin_path(name: str) -> Path:
    """The folder of the built-in base ``name`` (``shapes`` or ``difftune:shapes``)."""
    from difftune.errors import ConfigError, DifftuneError

    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if key not in BUILTIN:
        known = ", ".join(PREFIX + k for k in BUILTIN)
        raise ConfigError(f"model.path: {name!r} is not a built-in base (built-in: {known})")
    folder = BASES_DIR / BUILTIN[key]
    if not (folder / "model_index.json").is_file():
        raise DifftuneError(f"{PREFIX}{key}: the base's files are missing from {folder} (reinstall difftune)")
    return folder


def resolve(path: str) -> str:
    """``path`` itself, or the folder of a built-in ``difftune:<name>`` base."""
    return str(builtin_path(path)) if is_builtin(path) else path
