"""The README's config reference is generated from the schema and must stay in sync."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from difftune.config.reference import markdown_reference
from difftune.config.schema import SECTIONS

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def test_every_key_is_documented():
    text = markdown_reference()
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata["doc"], f"{name}.{f.name} has no documentation"
            assert f"`{name}.{f.name}`" in text


def test_readme_reference_matches_schema():
    readme = README.read_text()
    inside = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert inside == markdown_reference().strip(), (
        "README config reference is stale; regenerate it with: python scripts/update_readme.py"
    )
