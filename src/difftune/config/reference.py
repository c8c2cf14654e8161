"""Documentation generated from the schema: the README's config reference and ``difftune init``.

``registered`` gives the names of the registries some fields take (see ``opt(registry=...)``);
:func:`difftune.run_config.registered_choices` supplies them.
"""

from __future__ import annotations

import dataclasses
import typing

from difftune.config.loader import Registered, field_choices, toml_value, type_name
from difftune.config.schema import CONFIG_VERSION, SECTIONS

STARTER_VALUES = {
    "model.path": "difftune:shapes",
    "data.path": "my_images",
    "data.instance_prompt": "a zorb",
    "data.resolution": 64,
    "train.max_steps": 400,
    "train.learning_rate": 1e-3,
    "validation.prompts": ["a blue zorb on a white background"],
    "validation.every": 200,
    "output.dir": "runs/my-lora",
}


def _constraint(meta: dict, registered: Registered | None) -> str:
    parts = []
    choices = field_choices(meta, registered)
    if choices:
        parts.append("one of " + ", ".join(f"`{c}`" for c in choices))
    if meta.get("min") is not None:
        parts.append(f"{'>' if meta.get('min_exclusive') else '≥'} {meta['min']:g}")
    if meta.get("max") is not None:
        parts.append(f"≤ {meta['max']:g}")
    return "; ".join(parts)


def markdown_reference(registered: Registered | None = None) -> str:
    """Every key with its type, default, constraint and documentation, as Markdown."""
    lines = [f"Config version: `version = {CONFIG_VERSION}`.", ""]
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        lines += [f"### `[{name}]`", "", (cls.__doc__ or "").strip(), "",
                  "| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "unset" if default is None else f"`{toml_value(default)}`"
            doc = f.metadata["doc"].replace("|", "\\|")
            lines.append(f"| `{name}.{f.name}` | {type_name(hints[f.name])} | {shown} | {_constraint(f.metadata, registered)} | {doc} |")
        lines.append("")
    return "\n".join(lines)


def starter_config(registered: Registered | None = None) -> str:
    """A commented TOML config with every key, ready to edit."""
    out = ["# difftune run config. Check it with: difftune validate run.toml",
           "# Train with:                        difftune train run.toml",
           "# Every key is documented below; commented keys show their defaults.",
           "# It starts from difftune:shapes, the small 64 px base shipped inside difftune (docs/world.md);",
           "# for a real model set model.path to a Hub id or folder (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)",
           "# and data.resolution to its size (512), and use train.learning_rate = 1e-4.", "",
           f"version = {CONFIG_VERSION}"]
    for name, cls in SECTIONS.items():
        out += ["", f"[{name}]"]
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            out.append(f"# {f.metadata['doc']}")
            extra = _constraint(f.metadata, registered)
            if extra:
                out.append(f"# ({extra})")
            if key in STARTER_VALUES:
                out.append(f"{f.name} = {toml_value(STARTER_VALUES[key])}")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                out.append(f"# {f.name} = {'(unset)' if default is None else toml_value(default)}")
    return "\n".join(out) + "\n"
