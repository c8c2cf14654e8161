"""Read a TOML config, apply ``--set`` overrides and validate it strictly.

Every problem is reported as one line naming the key (``train.learning_rate``) or the path,
with the closest valid key for a typo, before any weights are loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from difftune.config.rules import validate_semantics
from difftune.config.schema import CONFIG_VERSION, SECTIONS, Config, field_default
from difftune.errors import ConfigError

#: Names registered elsewhere that a field may take (``registry`` in its metadata), e.g.
#: ``{"methods": ("full", "lora", ...)}``. The config package does not import the registries: the
#: caller passes their names (:func:`difftune.run_config.registered_choices`).
Registered = dict[str, tuple[str, ...]]


def all_keys() -> list[str]:
    keys = ["version"]
    for name, cls in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _closest(key: str, candidates: list[str]) -> str:
    """A ``(did you mean ...?)`` hint: the same key in another section first, then the nearest spelling."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf and c != key]
    match = same_leaf[:1] or difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not match:
        leaves = {c.rsplit(".", 1)[-1]: c for c in candidates}
        leaf_match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
        match = [leaves[leaf_match[0]]] if leaf_match else []
    return f" (did you mean {match[0]}?)" if match else ""


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as TOML, falling back to a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.learning_rate=5e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if raw.strip()[:1] in ("[", "{", '"', "'"):  # meant as a list, table or quoted string: not a bare word
            raise ConfigError(f"--set {key}: {raw!r} is not a valid TOML value ({exc})") from None
        value = raw
    return key, value


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key = "a.b.c"``, creating sections as needed."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set section.key=value`` strings to a raw config dict; unknown keys are refused."""
    for text in overrides:
        key, value = parse_override(text)
        if key not in all_keys():
            raise ConfigError(f"--set {key}: unknown key{_closest(key, all_keys())}")
        set_dotted(raw, key, value)
    return raw


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file (give the .toml file, e.g. {path / 'run.toml'})")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None


def parse_config(path: str | Path | None = None, overrides: list[str] | None = None,
                 data: dict | None = None, check_paths: bool = True, registered: Registered | None = None) -> Config:
    """Read, override and check a config. Raises :class:`ConfigError` with a one-line reason.

    Fields whose values name a registered entry are checked against ``registered`` when given; the
    method's own rules are not checked here (:func:`difftune.load_config` does both).
    """
    raw = dict(data or {})
    if path is not None:
        raw = read_toml(path)
    apply_overrides(raw, overrides or [])
    config = build_config(raw, registered)
    validate_semantics(config, check_paths=check_paths)
    return config


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "unset"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"a table of {type_name(key_tp)} → {type_name(value_tp)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


#: The word that unsets a key whose value may be absent and is not text (``--set train.snr_gamma=none``).
UNSET = "none"


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value == UNSET and str not in args:  # ``--set train.snr_gamma=none``: back to unset
            return None
        if len(args) == 1:  # ``X | None``: X's own reason (``not a finite number``, ...)
            return _coerce(key, value, args[0])
        for arg in args:
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table such as {{path = \"...\"}}, got {value!r}")
        return _build_table(key, tp, value)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
        return {_coerce(f"{key} (key)", k, key_tp): _coerce(f"{key}.{k}", v, value_tp) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {value!r} is not a finite number (NaN and infinity are refused)")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")


def field_choices(meta: dict, registered: Registered | None) -> tuple[str, ...] | None:
    """The values a field allows: its ``choices`` plus the names of its ``registry`` (if known)."""
    choices = tuple(meta.get("choices") or ())
    if meta.get("registry"):
        if registered is None or meta["registry"] not in registered:
            return None
        choices += tuple(registered[meta["registry"]])
    return choices or None


def _check_field(key: str, value: Any, meta: dict, registered: Registered | None = None) -> None:
    if value is None:
        return
    choices = field_choices(meta, registered)
    if choices and value not in choices:
        hint = difflib.get_close_matches(str(value), list(choices), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}{extra}")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            op = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"{key}: {value!r} is out of range (must be {op} {lo})")
        if hi is not None and value > hi:
            raise ConfigError(f"{key}: {value!r} is out of range (must be <= {hi})")


def build_config(raw: dict, registered: Registered | None = None) -> Config:
    """Turn a parsed TOML mapping into a typed :class:`Config`, rejecting anything unknown."""
    keys = all_keys()
    version = raw.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"version: this difftune reads config version {CONFIG_VERSION}, got {version!r}")
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "version":
            continue
        if name not in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: unknown key{_closest(name, keys)}; keys belong in a [section]")
            raise ConfigError(f"[{name}]: unknown section{_closest(name, list(SECTIONS))}")
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a [{name}] section, got {value!r}")
        sections[name] = _build_table(name, SECTIONS[name], value, keys, registered)
    return Config(version=CONFIG_VERSION, **sections)


def _build_table(prefix: str, cls: type, value: dict, keys: list[str] | None = None,
                 registered: Registered | None = None) -> Any:
    """A dataclass from a TOML table, strict about unknown keys, types and bounds.

    Used for sections and for list-of-table fields (``data.datasets[0].path``).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    candidates = keys if keys is not None else [f"{prefix}.{f}" for f in fields]
    kwargs = {}
    for key, item in value.items():
        dotted = f"{prefix}.{key}"
        if key not in fields:
            raise ConfigError(f"{dotted}: unknown key{_closest(dotted, candidates)}")
        coerced = _coerce(dotted, item, hints[key])
        _check_field(dotted, coerced, dict(fields[key].metadata), registered)
        kwargs[key] = coerced
    return cls(**kwargs)


def config_to_dict(config: Config) -> dict:
    """The resolved config as a plain mapping. TOML has no null: ``None`` values are dropped, except a key
    unset from a default that is not ``None`` (``train.max_grad_norm = "none"``), which is written as
    :data:`UNSET` so that reading the mapping back unsets it again instead of restoring the default."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    data = strip(dataclasses.asdict(config))
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        hints = typing.get_type_hints(type(values))
        for f in dataclasses.fields(values):
            default = field_default(f)
            if getattr(values, f.name) is None and default is not None and str not in typing.get_args(hints[f.name]):
                data[section.name][f.name] = UNSET
    return data


def flat_config(config: Config) -> dict[str, object]:
    """The resolved config as ``{"section.key": value}`` (what checkpoints record and trackers show)."""
    flat = {}
    for section, values in config_to_dict(config).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return flat


def dump_toml(data: dict) -> str:
    """Write a config mapping as TOML (the subset difftune configs use)."""
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for k, v in scalars.items():
        lines.append(f"{k} = {toml_value(v)}")
    for name, section in data.items():
        if isinstance(section, dict):
            lines.append("")
            lines.append(f"[{name}]")
            for k, v in section.items():
                lines.append(f"{k} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")
