"""The Configure page's server side: the form described from the schema, edits, validation, presets."""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from difftune.bases import is_builtin
from difftune.config.loader import field_choices, toml_value, type_name
from difftune.config.rules import looks_local
from difftune.config.schema import SECTIONS
from difftune.errors import DifftuneError
from difftune.run_config import load_config, registered_choices
from difftune.ui import toml_edit
from difftune.ui.paths import Root

#: Keys naming files or folders: the web app only accepts them inside its root (Hub ids and built-in names aside).
PATH_KEYS = ("model.path", "model.vae", "model.config", "data.path", "data.cache_dir", "validation.holdout",
             "prior_preservation.class_data", "output.dir", "train.resume")


def _kind(tp: Any, meta: dict) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    if tp is bool:
        return "bool"
    if tp is str:
        return "choice" if field_choices(meta, registered_choices()) else "text"
    if tp in (int, float):
        return "number"
    if typing.get_origin(tp) is list and typing.get_args(tp)[0] is str:
        return "lines"
    return "toml"


def schema_description() -> list[dict]:
    """Every section and key with its documentation, type, default, choices and bounds (for the form)."""
    out = []
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        fields = []
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            choices = field_choices(meta, registered_choices())
            choices = list(choices) if choices else None
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = _kind(hints[f.name], meta)
            fields.append({
                "key": f"{name}.{f.name}", "name": f.name, "kind": kind, "type": type_name(hints[f.name]),
                "default": None if default is None else display(kind, default), "choices": choices,
                "min": meta.get("min"), "max": meta.get("max"), "min_exclusive": bool(meta.get("min_exclusive")),
                "doc": meta["doc"],
            })
        out.append({"name": name, "doc": (cls.__doc__ or "").strip(), "fields": fields})
    return out


@functools.lru_cache(maxsize=1)
def _kinds() -> dict[str, str]:
    return {f["key"]: f["kind"] for s in schema_description() for f in s["fields"]}


def display(kind: str, value: Any) -> str:
    """How a value appears in its form field."""
    if kind == "lines" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if kind == "lines" and isinstance(value, str):  # a one-item list may be written as a plain string
        return value
    if kind in ("text", "choice") and isinstance(value, str):
        return value
    return toml_value(value)


def parse_field(kind: str, raw: str | None) -> Any:
    """A form field's text as a config value: empty is unset; numbers and tables read like ``--set``."""
    if raw is None:
        return None
    if kind in ("text", "choice"):
        return raw if raw != "" else None
    if kind == "lines":
        items = [line.strip() for line in raw.splitlines() if line.strip()]
        return items or None
    raw = raw.strip()
    if raw == "":
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # the validator then names the key and the expected type, as for --set


def form_values(text: str) -> dict[str, str]:
    """Display strings of the keys a TOML text sets (for filling the form)."""
    data = tomllib.loads(text)
    kinds = _kinds()
    out = {}
    for section, table in data.items():
        if section == "version" or not isinstance(table, dict):
            continue
        for key, value in table.items():
            dotted = f"{section}.{key}"
            out[dotted] = display(kinds.get(dotted, "toml"), value)
    return out


def edit(text: str, key: str, raw: str | None) -> str:
    """``text`` with one form field changed (only that key's line is rewritten)."""
    kinds = _kinds()
    if key not in kinds:
        raise DifftuneError(f"{key}: unknown key")
    section, name = key.split(".", 1)
    value = parse_field(kinds[key], raw)
    current = toml_edit.get_value(tomllib.loads(text), section, name)
    if isinstance(current, str) and value == [current]:
        value = current  # keep `token = "<sks>"` as written
    return toml_edit.set_value(text, section, name, value)


def check(text: str, root: Root, name: str = "run.toml") -> dict:
    """What ``difftune validate NAME`` says about ``text`` (run in the root), plus the root confinement.

    ``{"ok": bool, "message": str}``; the message is the CLI's line (``train.max_steps: ...``).
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return {"ok": False, "message": f"{name}: not valid TOML: {exc}"}
    try:
        config = load_config(data=raw)
        outside = outside_root(raw, root)
        if outside:
            raise DifftuneError(outside)
    except DifftuneError as exc:
        return {"ok": False, "message": str(exc)}
    return {"ok": True, "message": f"{name}: ok (model {config.model.path}, method {config.method.type}, "
                                   f"data {config.data.path})"}


def outside_root(raw: dict, root: Root) -> str | None:
    """A message naming the first path key whose file or folder lies outside the root, else None."""
    named = []
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = toml_edit.get_value(raw, section, key)
        if isinstance(value, str) and value:
            named.append((dotted, value))
    datasets = toml_edit.get_value(raw, "data", "datasets") or []
    for i, spec in enumerate(datasets if isinstance(datasets, list) else []):
        if isinstance(spec, dict) and isinstance(spec.get("path"), str):
            named.append((f"data.datasets[{i}].path", spec["path"]))
    for key, value in named:
        if key == "train.resume" and value == "latest":
            continue
        if key in ("model.path", "model.config", "data.path") or key.startswith("data.datasets"):
            if is_builtin(value) or not looks_local(value):
                continue  # a Hub id, or a built-in model
        if not root.contains(value):
            return (f"{key}: {value} is outside the root folder {root.path}; the web app only uses files under "
                    "it (start it with --root pointing higher)")
    return None


def presets(root: Root) -> list[dict]:
    """Shipped presets (the repository's ``configs/``) and any under ``ROOT/configs``: name, description, text."""
    import difftune

    folders = [Path(difftune.__file__).resolve().parents[2] / "configs", root.path / "configs"]
    seen, out = set(), []
    for folder in folders:
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            if path.name in seen:
                continue
            seen.add(path.name)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            first = next((line[1:].strip() for line in text.splitlines() if line.startswith("#")), "")
            out.append({"name": path.name, "description": first, "text": text})
    return out
