"""Configure: a form from the schema, edits that touch one line, the CLI's validation messages, presets that round-trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from tests.ui.conftest import tiny_config

from difftune.config.loader import all_keys
from difftune.ui import configs, toml_edit

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def test_the_form_has_every_key_with_its_documentation(served):
    schema = served.client.get("/api/schema")
    fields = {f["key"]: f for s in schema for f in s["fields"]}
    assert sorted(fields) == sorted(k for k in all_keys() if k != "version")
    lr = fields["train.learning_rate"]
    assert lr["kind"] == "number" and lr["default"] == "0.0001" and lr["max"] == 1.0 and "learning rate" in lr["doc"]
    assert fields["train.lr_scheduler"]["choices"][:2] == ["constant", "constant_with_warmup"]
    assert fields["validation.prompts"]["kind"] == "lines"
    assert fields["train.gradient_checkpointing"]["kind"] == "bool"
    assert fields["data.datasets"]["kind"] == "toml"
    assert "sd1" in fields["model.family"]["choices"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_round_trips_unchanged(served, preset):
    """Opened, every field sent back as the form shows it, and the text is byte for byte the file."""
    c = served.client
    state = c.post("/api/config/open", {"preset": preset.name})
    original = preset.read_text(encoding="utf-8")
    assert state["text"] == original
    text = original
    for key, shown in state["values"].items():
        text = c.post("/api/config/edit", {"text": text, "key": key, "value": shown})["text"]
    assert text == original


def test_an_edit_rewrites_one_line_and_keeps_comments(served):
    original = Path(PRESETS[0]).read_text()
    preset = next(p for p in PRESETS if p.name == "sd15-lora.toml").read_text()
    c = served.client
    edited = c.post("/api/config/edit", {"text": preset, "key": "train.max_steps", "value": "20"})["text"]
    diff = [(a, b) for a, b in zip(preset.splitlines(), edited.splitlines(), strict=True) if a != b]
    assert diff == [("max_steps = 1500", "max_steps = 20")]
    removed = c.post("/api/config/edit", {"text": edited, "key": "train.snr_gamma", "value": None})["text"]
    assert "snr_gamma" not in removed and removed.count("\n") == edited.count("\n") - 1
    added = c.post("/api/config/edit", {"text": removed, "key": "prior_preservation.num_class_images", "value": "3"})
    assert tomllib.loads(added["text"])["prior_preservation"] == {"num_class_images": 3}
    assert added["text"].startswith("# LoRA on Stable Diffusion 1.5")
    prompts = c.post("/api/config/edit", {"text": added["text"], "key": "validation.prompts", "value": "a dog\na cat\n"})
    assert tomllib.loads(prompts["text"])["validation"]["prompts"] == ["a dog", "a cat"]
    assert prompts["values"]["validation.prompts"] == "a dog\na cat"
    assert original  # the first preset is untouched on disk
    status, data = c.request("/api/config/edit", {"text": preset, "key": "train.nope", "value": "1"})
    assert status == 400 and "train.nope: unknown key" in data["error"]


def test_multiline_values_and_trailing_comments():
    text = 'version = 1\n\n[validation]\nprompts = [\n  "a",\n  "b",\n]  # two\nevery = 5   # often\n'
    out = toml_edit.set_value(text, "validation", "every", 10)
    assert out == text.replace("every = 5   # often", "every = 10   # often")
    out = toml_edit.set_value(text, "validation", "prompts", ["c"])
    assert out == 'version = 1\n\n[validation]\nprompts = ["c"]\nevery = 5   # often\n'
    dotted = 'version = 1\ntrain.max_steps = 5\n'
    assert tomllib.loads(toml_edit.set_value(dotted, "train", "max_steps", 7)) == {"version": 1, "train": {"max_steps": 7}}


def _cli_message(tmp_path, text, capsys) -> str:
    from difftune.cli import main

    path = tmp_path / "run.toml"
    path.write_text(text)
    assert main(["validate", str(path)]) != 0
    return capsys.readouterr().err.strip().removeprefix("difftune: error: ")


@pytest.mark.parametrize("edit", [
    ("train.max_steps", "abc"), ("train.learning_rate", "5"), ("train.lr_scheduler", "cosin"),
    ("data.path", "./data/missing"), ("model.path", "./models/nothing"), ("validation.every", "-1"),
])
def test_validation_says_what_difftune_validate_says(served, tmp_path, capsys, edit):
    key, value = edit
    state = served.client.post("/api/config/edit", {"text": tiny_config(), "key": key, "value": value})
    assert not state["check"]["ok"]
    assert state["check"]["message"] == _cli_message(tmp_path, state["text"], capsys)


def test_typos_and_bad_toml_are_named_as_the_cli_names_them(served, tmp_path, capsys):
    text = tiny_config().replace("learning_rate", "learnig_rate")
    check = served.client.post("/api/config/parse", {"text": text})["check"]
    assert check["message"] == _cli_message(tmp_path, text, capsys)
    assert check["message"] == "train.learnig_rate: unknown key (did you mean train.learning_rate?)"
    check = served.client.post("/api/config/parse", {"text": "version = 1\n[train\n", "name": "run.toml"})["check"]
    assert check["message"].startswith("run.toml: not valid TOML:")
    ok = served.client.post("/api/config/parse", {"text": tiny_config()})["check"]
    assert ok == {"ok": True, "message": "run.toml: ok (model models/tiny-sd, method lora, data data/shapes)"}


def test_open_save_and_refuse_to_overwrite(served, ui_root):
    c = served.client
    c.post("/api/config/save", {"path": "configs/mine.toml", "text": tiny_config()})
    assert (ui_root / "configs" / "mine.toml").read_text() == tiny_config()
    status, data = c.request("/api/config/save", {"path": "configs/mine.toml", "text": "version = 1\n"})
    assert status == 400 and "exists" in data["error"]
    assert (ui_root / "configs" / "mine.toml").read_text() == tiny_config()
    c.post("/api/config/save", {"path": "configs/mine.toml", "text": tiny_config(steps=3), "overwrite": True})
    opened = c.post("/api/config/open", {"path": "configs/mine.toml"})
    assert opened["text"] == tiny_config(steps=3) and opened["values"]["train.max_steps"] == "3"
    presets = c.get("/api/presets")
    assert "mine.toml" in [p["name"] for p in presets]  # ROOT/configs holds presets too
    assert {p.name for p in PRESETS} <= {p["name"] for p in presets}


def test_parse_field_reads_values_like_set():
    assert configs.parse_field("number", "5e-5") == 5e-5
    assert configs.parse_field("number", "abc") == "abc"
    assert configs.parse_field("text", "123") == "123"
    assert configs.parse_field("lines", " a \n\n b") == ["a", "b"]
    assert configs.parse_field("toml", '{ "x" = 3 }') == {"x": 3}
    assert configs.parse_field("number", "") is None
