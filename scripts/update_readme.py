"""Regenerate the parts of README.md that come from the code (commands, families, methods,
presets, the config reference) and the grammar in docs/world.md. Run after changing the schema,
the CLI, the presets or the world's grammar:

    python scripts/update_readme.py          # rewrite README.md and docs/world.md
    python scripts/update_readme.py --check  # exit 1 if either is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WORLD_DOC = ROOT / "docs" / "world.md"


def commands_table() -> str:
    from difftune.cli import COMMANDS

    rows = ["| command | what it does |", "|---|---|"]
    rows += [f"| `difftune {name}` | {entry[1]} |" for name, entry in COMMANDS.items()]
    return "\n".join(rows)


def families_and_methods() -> str:
    from difftune.methods import METHODS
    from difftune.models import FAMILIES
    from difftune.objectives import OBJECTIVES

    rows = ["| model family (`model.family`) | architecture | objective | default LoRA targets |", "|---|---|---|---|"]
    for name in FAMILIES.names():
        fam = FAMILIES.get(name)
        rows.append(f"| `{name}` | {fam.title} | `{fam.objective}` | {', '.join(f'`{t}`' for t in fam.default_lora_targets)} |")
    rows += ["", "| method (`method.type`) | what trains |", "|---|---|"]
    for name in METHODS.names():
        doc = (METHODS.get(name).load().__doc__ or "").strip().splitlines()[0]
        rows.append(f"| `{name}` | {doc} |")
    rows += ["", f"Objectives: {', '.join(f'`{n}`' for n in OBJECTIVES.names())}."]
    return "\n".join(rows)


def presets_table() -> str:
    rows = ["| preset | what it is |", "|---|---|"]
    for path in sorted((ROOT / "configs").glob("*.toml")):
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        rows.append(f"| [`configs/{path.name}`](configs/{path.name}) | {first} |")
    return "\n".join(rows)


def base_hashes() -> str:
    """The sha256 of every file of the embedded base that carries weights or vocabulary."""
    from difftune.bases import builtin_path

    manifest = (builtin_path("shapes") / "SHA256SUMS").read_text().splitlines()
    kept = [line for line in manifest if line.endswith((".safetensors", "vocab.json", "merges.txt"))]
    return "```text\n" + "\n".join(kept) + "\n```"


def sections() -> dict[str, str]:
    from difftune.config.reference import markdown_reference
    from difftune.run_config import registered_choices

    return {
        "commands": commands_table(),
        "families": families_and_methods(),
        "presets": presets_table(),
        "config-reference": markdown_reference(registered_choices()).strip(),
        "base-hashes": base_hashes(),
    }


def world_sections() -> dict[str, str]:
    from difftune.world.docs import grammar_markdown

    return {"world-grammar": grammar_markdown()}


def render(text: str, generated: dict[str, str] | None = None, name: str = "README.md") -> str:
    for section, body in (sections() if generated is None else generated).items():
        begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
        if begin not in text or end not in text:
            raise SystemExit(f"{name} has no {begin} ... {end} markers")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{body}\n{end}{tail}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for path, generated in ((README, sections()), (WORLD_DOC, world_sections())):
        current = path.read_text()
        updated = render(current, generated, path.name)
        if updated == current:
            continue
        if args.check:
            stale.append(path.relative_to(ROOT).as_posix())
        else:
            path.write_text(updated)
    if stale:
        print(f"{', '.join(stale)} stale: run python scripts/update_readme.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
