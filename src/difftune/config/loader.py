"""Read a TOML config, apply ``--set`` overrides and validate it strictly.

Every problem is reported as one line naming the key (``train.learning_rate``) or the path,
with the closest valid key for a typo, before any weights are loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from difftune.config.schema import CONFIG_VERSION, SECTIONS, Config
from difftune.errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None, check_paths: bool = True) -> Config:
    """Load, override and validate a config. Raises :class:`ConfigError` with a one-line reason."""
    raw = dict(data or {})
    if path is not None:
        raw = read_toml(path)
    for text in overrides or []:
        key, value = parse_override(text)
        if key not in all_keys():
            raise ConfigError(f"--set {key}: unknown key{_closest(key, all_keys())}")
        _set_dotted(raw, key, value)
    config = build_config(raw)
    validate_semantics(config, check_paths=check_paths)
    return config


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "unset"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"a table of {_type_name(key_tp)} → {_type_name(value_tp)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        for arg in args:
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table such as {{path = \"...\"}}, got {value!r}")
        return _build_table(key, tp, value)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return {_coerce(f"{key} (key)", k, key_tp): _coerce(f"{key}.{k}", v, value_tp) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _check_field(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
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


def build_config(raw: dict) -> Config:
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
        sections[name] = _build_table(name, SECTIONS[name], value, keys)
    return Config(version=CONFIG_VERSION, **sections)


def _build_table(prefix: str, cls: type, value: dict, keys: list[str] | None = None) -> Any:
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
        _check_field(dotted, coerced, dict(fields[key].metadata))
        kwargs[key] = coerced
    return cls(**kwargs)


def _looks_local(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.endswith((".safetensors", ".ckpt", ".bin", ".pt"))
        or not HUB_ID.match(text)
    )


def validate_semantics(config: Config, check_paths: bool = True) -> None:
    """Cross-field checks and path checks. Loads no weights."""
    if not config.model.path:
        raise ConfigError("model.path: required; give a diffusers folder, a .safetensors file or a Hub id")
    if not config.data.path and not config.data.datasets:
        raise ConfigError("data.path: required; give an image folder or a dataset (or data.datasets)")
    for i, spec in enumerate(config.data.datasets):
        if not spec.path:
            raise ConfigError(f"data.datasets[{i}].path: required; give an image folder or a dataset")
    if check_paths:
        named = [("model.path", config.model.path), ("data.path", config.data.path)]
        named += [(f"data.datasets[{i}].path", d.path) for i, d in enumerate(config.data.datasets)]
        for key, value in named:
            p = Path(value).expanduser()
            if value and not p.exists() and _looks_local(value):
                raise ConfigError(f"{key}: {value} does not exist")
        vae = config.model.vae
        if vae and not Path(vae).expanduser().exists():
            raise ConfigError(f"model.vae: {vae} does not exist; give a VAE folder or a .safetensors file")
        resume = config.train.resume
        if resume and resume != "latest" and not Path(resume).expanduser().is_dir():
            raise ConfigError(f"train.resume: {resume} is not a checkpoint folder (or use \"latest\")")
    from difftune.data.options import validate_data_options

    validate_data_options(config)
    if config.data.caption_source == "instance_prompt" and not config.data.instance_prompt:
        raise ConfigError('data.instance_prompt: required when data.caption_source = "instance_prompt"')
    mp = config.train.mixed_precision
    if config.model.dtype == "fp16" and mp == "bf16":
        raise ConfigError("model.dtype: fp16 weights with bf16 mixed precision; use model.dtype = \"bf16\"")
    _validate_method_and_extras(config, check_paths)
    max_steps = config.train.max_steps
    if max_steps is not None and config.train.warmup_steps > max_steps:
        raise ConfigError(
            f"train.warmup_steps: {config.train.warmup_steps} is more than train.max_steps ({max_steps})"
        )


def _validate_method_and_extras(config: Config, check_paths: bool) -> None:
    """Checks owned by the method, prior preservation and the held-out split."""
    from difftune.methods import METHODS

    method_cls = METHODS.get(config.method.type)
    method_cls.check_config(config)
    prior = config.prior_preservation
    if prior.class_prompt:
        if not method_cls.supports_prior_preservation:
            raise ConfigError(
                f"prior_preservation.class_prompt: method.type = {config.method.type!r} does not use prior "
                "preservation; use \"lora\" or \"full\", or remove the [prior_preservation] section"
            )
        if not prior.class_data:
            raise ConfigError("prior_preservation.class_data: required with class_prompt (a folder for class images)")
        if check_paths and Path(prior.class_data).expanduser().is_file():
            raise ConfigError(f"prior_preservation.class_data: {prior.class_data} is a file, not a folder")
    elif prior.class_data:
        raise ConfigError("prior_preservation.class_prompt: required when class_data is set")
    val = config.validation
    if isinstance(val.holdout, float) and not 0.0 < val.holdout < 1.0:
        raise ConfigError(f"validation.holdout: {val.holdout!r} must be a fraction between 0 and 1, or a folder")
    if isinstance(val.holdout, str) and check_paths and not Path(val.holdout).expanduser().is_dir():
        raise ConfigError(f"validation.holdout: {val.holdout} is not a folder (give a fraction such as 0.1, or a folder)")
    if val.holdout is None:
        for key in ("loss_every", "patience"):
            if getattr(val, key):
                raise ConfigError(f"validation.{key}: needs validation.holdout (a fraction such as 0.1, or a folder)")


def config_to_dict(config: Config) -> dict:
    """The resolved config as a plain mapping (``None`` values are dropped, as TOML has no null)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(dataclasses.asdict(config))


def dump_toml(data: dict) -> str:
    """Write a config mapping as TOML (the subset difftune configs use)."""
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for k, v in scalars.items():
        lines.append(f"{k} = {_toml_value(v)}")
    for name, section in data.items():
        if isinstance(section, dict):
            lines.append("")
            lines.append(f"[{name}]")
            for k, v in section.items():
                lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        import json

        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        import json

        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")
