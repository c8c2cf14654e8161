"""No code outside ``difftune/models/`` compares anything with a model family's name.

Behaviour that differs between families belongs behind the ModelFamily interface; a test such
as ``if family.name == "sdxl"`` or ``"flux" in model_type`` elsewhere would bypass it.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

from difftune.models import FAMILIES

SRC = Path(__file__).resolve().parents[1] / "src" / "difftune"
#: Registered names plus the words people use for them.
WORDS = {*FAMILIES.names(), "xl", "sd15", "sd21", "sd35", "flux1", "schnell", "dev", "sd_xl", "sdxl_base"}
COMPARE_OPS = {"==", "!="}
NAME_COMPARE = re.compile(r"(family|families)\w*\.name\s*(==|!=|\bin\b|\bnot in\b)|(==|!=)\s*\w*family\w*\.name")


def _names_a_family(literal: str) -> bool:
    try:
        value = eval(literal, {})  # noqa: S307 - a string literal token from our own source
    except Exception:  # noqa: BLE001 - f-strings and the like are not plain literals
        return False
    if not isinstance(value, str):
        return False
    parts = set(re.split(r"[^a-z0-9_]+", value.lower())) | {value.lower()}
    return bool(parts & WORDS)


def family_comparisons(source: str) -> list[str]:
    """Lines that compare a family-name string (``==``, ``!=``, ``in``) or a ``family.name``."""
    hits = []
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)]
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.STRING or not _names_a_family(tok.string):
            continue
        before = tokens[i - 1].string if i else ""
        after = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if before in COMPARE_OPS or after in COMPARE_OPS or after in ("in", "not") or before == "in":
            hits.append(tok.line.strip())
    hits += [line.strip() for line in source.splitlines() if NAME_COMPARE.search(line)]
    # Membership in a literal collection of names: ``name in ("sd1", "sdxl")``.
    hits += [m.group(0) for m in re.finditer(r"\bin\s*[\(\[\{][^\)\]\}]*[\)\]\}]", source)
             if any(_names_a_family(s) for s in re.findall(r"\"[^\"]*\"|'[^']*'", m.group(0)))]
    return hits


def test_the_detector_finds_family_comparisons():
    assert family_comparisons('if family.name == "sdxl":\n    pass\n')
    assert family_comparisons('x = "flux" in model_type\n')
    assert family_comparisons('if kind != "sd3":\n    pass\n')
    assert family_comparisons('ok = name in ("sd1", "xl")\n')
    assert not family_comparisons('meta = {"difftune.family": family.name}\n')


def test_no_family_name_is_compared_outside_models():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if (SRC / "models") in path.parents:
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(SRC)}: {line}" for line in family_comparisons(text)]
    assert offenders == []
