"""A Hugging Face model card (README.md with a YAML header) for a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difftune.fileio import atomic_write_text


def _yaml_scalar(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def render_model_card(
    *,
    base_model: str,
    family_title: str,
    tags: list[str],
    license: str,  # noqa: A002 - the Hub's key name
    instance_prompt: str | None,
    summary: dict[str, Any],
    training: dict[str, Any],
    samples: list[tuple[str, str]],
    usage: str,
    title: str,
    tool_usage: str = "",
    options: str = "",
) -> str:
    """``samples`` are (prompt, relative image path) pairs from the last validation."""
    header = ["---", f"base_model: {_yaml_scalar(base_model)}", f"license: {_yaml_scalar(license)}",
              "library_name: diffusers", "pipeline_tag: text-to-image", "tags:"]
    header += [f"- {_yaml_scalar(t)}" for t in tags]
    if instance_prompt:
        header.append(f"instance_prompt: {_yaml_scalar(instance_prompt)}")
    if samples:
        header.append("widget:")
        for prompt, path in samples:
            header += [f"- text: {_yaml_scalar(prompt)}", "  output:", f"    url: {_yaml_scalar(path)}"]
    header.append("---")
    body = [f"# {title}", "", f"Fine-tuned from [{base_model}]({_hub_link(base_model)}) ({family_title}) with difftune.", ""]
    if instance_prompt:
        body += [f"Trigger / instance prompt: `{instance_prompt}`", ""]
    body += ["## Method", "", "| | |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in summary.items()]
    body += ["", "## Training", "", "| | |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in training.items()]
    if options:
        body += ["", "### Active options", "", "```", options.rstrip(), "```"]
    if samples:
        body += ["", "## Validation samples", ""]
        body += [f"![{prompt}]({path})  \n`{prompt}`" for prompt, path in samples]
    body += ["", "## Use it", "", "### diffusers", "", "```python", usage.rstrip(), "```", ""]
    if tool_usage:
        body += [tool_usage.rstrip(), ""]
    return "\n".join(header + [""] + body)


def _hub_link(base_model: str) -> str:
    if Path(base_model).exists():
        return Path(base_model).as_posix()
    return f"https://huggingface.co/{base_model}"


def write_model_card(path: Path, **kwargs: Any) -> None:
    atomic_write_text(path, render_model_card(**kwargs))
