"""Fuzz-style: many generated bad configs and ``--set`` values, each one exit 2 and one line naming the key.

The cases are generated from the schema (every key of every section): values of the wrong type,
NaN and infinity for every number, values just outside each bound, names outside each key's choices,
and keys written in the wrong section. ``difftune validate`` runs in-process (no torch is loaded).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from difftune.cli import main
from difftune.config.loader import toml_value
from difftune.config.schema import SECTIONS

WRONG_TYPE = {int: ["\"three\"", "1.5", "true", "[1]"], float: ["\"fast\"", "true", "[0.1]"],
              bool: ["1", "\"yes\""], str: ["5", "true", "{a = 1}"]}
NON_FINITE = ["nan", "inf", "-inf", "+nan"]


def _base(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, type(int | None)) and len(args) == 1 else tp


def bad_values() -> list[tuple[str, str]]:
    """``(key, TOML value)`` pairs that must each be refused, from every field of the schema."""
    cases = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, tp, meta = f"{section}.{f.name}", _base(hints[f.name]), f.metadata
            origin = typing.get_origin(tp)
            if origin is list:
                item = typing.get_args(tp)[0]
                cases += [(key, "5"), (key, "{a = 1}")]
                cases += [(key, "[5]")] if item is str else [(key, "[5]"), (key, "[{nope = 1}]")]
                continue
            if origin is dict:
                value_tp = typing.get_args(tp)[1]
                cases += [(key, "5"), (key, "{a = \"x\"}" if value_tp is not str else "{a = 1}")]
                if value_tp is float:
                    cases += [(key, "{a = nan}"), (key, "{a = inf}")]
                continue
            cases += [(key, v) for v in WRONG_TYPE.get(tp, [])]
            if tp is float:
                cases += [(key, v) for v in NON_FINITE]
            if tp in (int, float) and meta.get("min") is not None:
                lo = meta["min"]
                cases.append((key, toml_value(lo if meta.get("min_exclusive") else tp(lo - 1))))
            if tp in (int, float) and meta.get("max") is not None:
                cases.append((key, toml_value(tp(meta["max"] + 1))))
            if meta.get("choices") or meta.get("registry"):
                cases.append((key, "\"not-a-choice\""))
    return cases


CASES = bad_values()


def wrong_sections() -> list[tuple[str, str]]:
    """Every key written into each section it does not belong to (a few sections, to stay fast)."""
    cases = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            for other in ("train", "data", "output"):
                if other != section and f.name not in {g.name for g in dataclasses.fields(SECTIONS[other])}:
                    cases.append((f"{other}.{f.name}", "1"))
    return cases


@pytest.fixture
def good(tmp_path, tiny_sd, shapes_data) -> dict[str, dict[str, str]]:
    return {"model": {"path": toml_value(str(tiny_sd))}, "data": {"path": toml_value(str(shapes_data))},
            "output": {"dir": toml_value(str(tmp_path / "out"))}}


def write_config(tmp_path: Path, sections: dict[str, dict[str, str]]) -> Path:
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
                   for name, values in sections.items())
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def refused(capsys, argv: list[str], key: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{argv[2:]} was accepted (exit {code}): {err}"
    assert len(err.splitlines()) == 1, err
    assert err.startswith("difftune: error: ") and key in err, f"{key} not named in: {err}"


def test_the_generated_cases_cover_every_kind(good):
    keys = {k for k, _ in CASES}
    assert len(CASES) > 250 and "train.learning_rate" in keys and "method.alpha_pattern" in keys
    assert {v for k, v in CASES if k == "train.max_grad_norm"} >= {"nan", "inf", "-inf"}


def test_every_bad_value_in_a_config_file_is_refused_naming_its_key(tmp_path, good, capsys):
    for key, value in CASES:
        section, name = key.split(".")
        sections = {s: dict(v) for s, v in good.items()}
        sections.setdefault(section, {})[name] = value
        refused(capsys, ["validate", str(write_config(tmp_path, sections))], key)


def test_every_bad_set_value_is_refused_naming_its_key(tmp_path, good, capsys):
    path = str(write_config(tmp_path, good))
    assert main(["validate", path]) == 0
    capsys.readouterr()
    for key, value in CASES:
        refused(capsys, ["validate", path, "--set", f"{key}={value}"], key)


def test_keys_in_the_wrong_section_are_refused_naming_them(tmp_path, good, capsys):
    path = str(write_config(tmp_path, good))
    cases = wrong_sections()
    assert len(cases) > 100
    for key, value in cases:
        refused(capsys, ["validate", path, "--set", f"{key}={value}"], key)
        section, name = key.split(".")
        sections = {s: dict(v) for s, v in good.items()}
        sections.setdefault(section, {})[name] = value
        refused(capsys, ["validate", str(write_config(tmp_path, sections))], key)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_non_finite_numbers_are_refused_in_tables_of_lists(tmp_path, good, capsys, shapes_data, value):
    path = str(write_config(tmp_path, good))
    spec = f"[{{path = {toml_value(str(shapes_data))}, weight = {value}}}]"
    refused(capsys, ["validate", path, "--set", f"data.datasets={spec}"], "data.datasets[0].weight")


@pytest.mark.parametrize("raw", ['["a",', "{a = 1", '"unterminated', "[1, 2"])
def test_a_set_value_that_is_not_valid_toml_is_refused(tmp_path, good, capsys, raw):
    path = str(write_config(tmp_path, good))
    refused(capsys, ["validate", path, "--set", f"validation.prompts={raw}"], "validation.prompts")


def test_a_bare_word_still_sets_a_string(tmp_path, good):
    from difftune import load_config

    config = load_config(write_config(tmp_path, good), overrides=["train.mixed_precision=bf16", "output.license=mit"])
    assert (config.train.mixed_precision, config.output.license) == ("bf16", "mit")
