"""The README's generated parts (config reference, commands, families, presets) match the code."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from difftune.config.reference import markdown_reference
from difftune.config.schema import SECTIONS

ROOT = Path(__file__).resolve().parents[2]


def test_every_key_is_documented():
    text = markdown_reference()
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata["doc"], f"{name}.{f.name} has no documentation"
            assert f"`{name}.{f.name}`" in text


def test_readme_generated_sections_are_current():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (ROOT / "README.md").read_text()
    assert module.render(current) == current, "README is stale; regenerate it with: python scripts/update_readme.py"


def test_readme_has_exactly_the_two_fresh_machine_commands():
    readme = (ROOT / "README.md").read_text()
    for marker in ("demo-command", "test-command"):
        block = readme.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
        lines = [ln for ln in block.strip().splitlines() if not ln.startswith("```")]
        assert len(lines) == 1 and lines[0].startswith("pip install "), marker
