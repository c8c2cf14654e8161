"""Change one key of a TOML text and nothing else: comments, order and spacing survive.

A config opened in the web app round-trips byte for byte; a change from the form rewrites
only the line(s) of that key. Texts this cannot edit in place (a key written as a dotted key
or inside an inline table) are rewritten whole from their parsed values, which keeps every value.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from difftune.config.loader import dump_toml, toml_value

_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-]+)\s*\]\s*(#.*)?$")
_ARRAY_HEADER = re.compile(r"^\s*\[\[")


def _key_line(key: str) -> re.Pattern:
    return re.compile(rf"^(\s*){re.escape(key)}\s*=")


def get_value(data: dict, section: str | None, key: str) -> Any:
    table = data if section is None else data.get(section)
    return table.get(key) if isinstance(table, dict) else None


def set_value(text: str, section: str | None, key: str, value: Any) -> str:
    """``text`` with ``[section] key`` set to ``value`` (``None`` removes it). ``section=None``: top level."""
    data = tomllib.loads(text)
    if get_value(data, section, key) == value and (value is not None) == _has(data, section, key):
        return text
    lines = text.splitlines(keepends=True)
    start, end = _block(lines, section)
    if start is None:
        if section in data:  # the table exists, written as dotted keys or inline: rewrite whole
            return _rewrite(data, section, key, value)
        if value is None:
            return text
        if section is None:  # top-level key in a text that starts with a table: put it first
            return f"{key} = {toml_value(value)}\n" + text
        sep = "" if not text or text.endswith("\n") else "\n"
        return f"{text}{sep}\n[{section}]\n{key} = {toml_value(value)}\n"
    found = _find_key(lines, start, end, key)
    if found is None:
        if _has(data, section, key):  # written some other way (dotted key, inline table): rewrite whole
            return _rewrite(data, section, key, value)
        if value is None:
            return text
        at = _insert_point(lines, start, end)
        new = f"{key} = {toml_value(value)}\n"
        if at > 0 and not lines[at - 1].endswith("\n"):
            lines[at - 1] += "\n"
        lines.insert(at, new)
        return "".join(lines)
    first, count, indent, comment = found
    replacement = [] if value is None else [f"{indent}{key} = {toml_value(value)}{comment}\n"]
    last = lines[first + count - 1]
    if replacement and not last.endswith("\n"):
        replacement[0] = replacement[0][:-1]
    lines[first:first + count] = replacement
    out = "".join(lines)
    if get_value(tomllib.loads(out), section, key) != value:  # defensive: never return a wrong text
        return _rewrite(data, section, key, value)
    return out


def _has(data: dict, section: str | None, key: str) -> bool:
    table = data if section is None else data.get(section)
    return isinstance(table, dict) and key in table


def _rewrite(data: dict, section: str | None, key: str, value: Any) -> str:
    table = data if section is None else data.setdefault(section, {})
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value
    return dump_toml(data)


def _block(lines: list[str], section: str | None) -> tuple[int | None, int]:
    """Line range [start, end) of a section's keys (the top level when ``section`` is None)."""
    headers = [i for i, line in enumerate(lines) if _HEADER.match(line) or _ARRAY_HEADER.match(line)]
    if section is None:
        return 0, headers[0] if headers else len(lines)
    for n, i in enumerate(headers):
        m = _HEADER.match(lines[i])
        if m and m.group(1) == section:
            return i + 1, headers[n + 1] if n + 1 < len(headers) else len(lines)
    return None, 0


def _find_key(lines: list[str], start: int, end: int, key: str) -> tuple[int, int, str, str] | None:
    """(first line, line count, indent, trailing comment) of ``key = value`` inside the block."""
    pattern = _key_line(key)
    for i in range(start, end):
        m = pattern.match(lines[i])
        if not m:
            continue
        for count in range(1, end - i + 1):  # a value may span lines (arrays, multi-line strings)
            chunk = "".join(lines[i:i + count])
            try:
                parsed = tomllib.loads(chunk)
            except tomllib.TOMLDecodeError:
                continue
            if key in parsed:
                return i, count, m.group(1), _comment(lines[i + count - 1], parsed[key], key, count)
        return None
    return None


def _comment(line: str, value: Any, key: str, count: int) -> str:
    """The ``   # ...`` after a one-line value, kept when the value changes."""
    if count != 1 or "#" not in line:
        return ""
    body = line.rstrip("\r\n")
    for pos in [i for i, ch in enumerate(body) if ch == "#"]:
        try:
            if tomllib.loads(body[:pos]).get(key) == value:
                head = body[:pos]
                return body[len(head.rstrip()):]
        except tomllib.TOMLDecodeError:
            continue
    return ""


def _insert_point(lines: list[str], start: int, end: int) -> int:
    """After the block's last non-blank, non-comment line (so a next section's comment stays with it)."""
    at = start
    for i in range(start, end):
        stripped = lines[i].strip()
        if stripped and not stripped.startswith("#"):
            at = i + 1
    return at
