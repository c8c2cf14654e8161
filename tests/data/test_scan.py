"""Every kind of bad file is reported with its named reason; good images survive."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageFile

from difftune.config.schema import DataConfig
from difftune.data.sources import load_examples, scan
from difftune.errors import DifftuneError

from .helpers import bomb_png, messy_folder, png


def _by_name(problems):
    out = {}
    for p in problems:
        out.setdefault(p.name.rsplit("/", 1)[-1], []).append(p)
    return out


def test_every_bad_file_is_reported_with_its_reason(tmp_path):
    expected = messy_folder(tmp_path / "d")
    result = scan(DataConfig(path=str(tmp_path / "d"), min_size=16))
    found = _by_name(result.problems)
    for name, kind in expected.items():
        assert name in found, f"{name} not reported; got {sorted(found)}"
        assert any(p.kind == kind and p.severity == "skipped" for p in found[name]), (name, found[name])
    assert sorted(ex.name for ex in result.examples) == [f"good{i}.png" for i in range(4)]
    captions = {ex.name: ex.caption for ex in result.examples}
    assert captions["good0.png"] == "from metadata" and captions["good1.png"] == "a good image 1"
    assert "11 skipped" in result.skipped_summary() or result.skipped_summary().startswith(str(len(result.skipped)))
    assert "unsafe" in found["metadata.jsonl:5"][0].detail


def test_on_bad_file_error_stops_with_the_list(tmp_path):
    messy_folder(tmp_path / "d")
    with pytest.raises(DifftuneError) as err:
        load_examples(DataConfig(path=str(tmp_path / "d"), on_bad_file="error"))
    msg = str(err.value)
    for name in ("bomb.png", "truncated.jpg", "Thumbs.db", "metadata.jsonl:5"):
        assert name in msg


def test_skip_logs_each_file(tmp_path):
    messy_folder(tmp_path / "d")
    lines = []
    result = load_examples(DataConfig(path=str(tmp_path / "d")), log=lines.append)
    assert len(result.examples) == 4
    assert any("bomb.png: too large" in line for line in lines)
    assert len([line for line in lines if line.startswith("skipping")]) == len(result.skipped)


def test_bomb_is_refused_without_decoding(tmp_path, monkeypatch):
    bomb_png(tmp_path / "bomb.png")

    def no_decode(self):
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    result = scan(DataConfig(path=str(tmp_path)))
    (problem,) = result.problems
    assert problem.kind == "too large" and "without decoding" in problem.detail
    assert not result.examples


def test_bomb_beyond_pils_own_limit_is_refused(tmp_path):
    bomb_png(tmp_path / "huge.png", 1_000_000, 1_000_000)
    (problem,) = scan(DataConfig(path=str(tmp_path))).problems
    assert problem.kind == "too large"


def test_max_pixels_and_min_size_are_configurable(tmp_path):
    png(tmp_path / "a.png", size=(100, 50))
    (tmp_path / "a.txt").write_text("x")
    assert scan(DataConfig(path=str(tmp_path), max_pixels=4999)).problems[0].kind == "too large"
    assert scan(DataConfig(path=str(tmp_path), min_size=51)).problems[0].kind == "too small"
    assert len(scan(DataConfig(path=str(tmp_path), min_size=50, max_pixels=5000)).examples) == 1


@pytest.mark.parametrize(("raw", "expected", "severity"), [
    ("ünïcode".encode("utf-16"), "ünïcode", "note"),
    (b"\xef\xbb\xbfbom caf\xc3\xa9", "bom café", None),
    ("café – naïve".encode("cp1252"), "café – naïve", "warning"),
])
def test_caption_encodings(tmp_path, raw, expected, severity):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(raw)
    result = scan(DataConfig(path=str(tmp_path)))
    assert result.examples[0].caption == expected
    enc = [p for p in result.problems if p.kind == "caption encoding"]
    if severity is None:
        assert not enc
    else:
        assert enc[0].severity == severity
        if severity == "warning":
            assert "cp1252" in enc[0].detail


def test_missing_and_empty_captions(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("   ")
    result = scan(DataConfig(path=str(tmp_path)))
    kinds = {p.name.rsplit("/", 1)[-1]: p.kind for p in result.problems}
    assert kinds == {"a.png": "no caption", "b.png": "empty caption"}
    assert not result.examples
    with_prompt = scan(DataConfig(path=str(tmp_path), instance_prompt="a photo of sks dog"))
    assert [ex.caption for ex in with_prompt.examples] == ["a photo of sks dog"] * 2


def test_handled_conversions_are_noted(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)
    Image.new("CMYK", (30, 30)).save(tmp_path / "cmyk.jpg")
    Image.new("RGBA", (30, 30)).save(tmp_path / "alpha.png")
    for f in ("rot", "cmyk", "alpha"):
        (tmp_path / f"{f}.txt").write_text("x")
    result = scan(DataConfig(path=str(tmp_path)))
    notes = {p.name.rsplit("/", 1)[-1]: p.detail for p in result.problems if p.severity == "note"}
    assert "EXIF orientation 6" in notes["rot.jpg"]
    assert "CMYK" in notes["cmyk.jpg"] and "transparency" in notes["alpha.png"]
    sizes = {ex.name: ex.size for ex in result.examples}
    assert sizes["rot.jpg"] == (40, 20)  # (height, width) after rotation


def test_metadata_pointing_outside_via_symlinked_name_is_refused(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    png(tmp_path / "secret.png")
    png(root / "a.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/../../secret.png", "text": "x"}) + "\n")
    result = scan(DataConfig(path=str(root), instance_prompt="p"))
    assert [p.kind for p in result.problems if p.severity == "skipped"] == ["unsafe path"]
