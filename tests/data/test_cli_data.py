"""``difftune data check``, ``data prepare`` and ``cache`` through the real command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from difftune.cli import main

from .helpers import messy_folder, png


def test_check_reports_problems_and_json(tmp_path, capsys):
    expected = messy_folder(tmp_path / "d")
    png(tmp_path / "d" / "copy.png", colour=(0, 100, 200))  # same bytes as good0.png
    (tmp_path / "d" / "copy.txt").write_text(" ".join(["word"] * 90))
    assert main(["data", "check", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    assert "usable images: 5" in text and "64x64" not in text
    for name in expected:
        assert name in text
    assert "duplicates: copy.png, good0.png" in text
    assert "caption too long: 92 tokens, limit 77: the last 15 are cut" in text
    assert "estimated, CLIP-style 77-token limit" in text

    assert main(["data", "check", str(tmp_path / "d"), "--strict"]) == 1
    capsys.readouterr()
    assert main(["data", "check", str(tmp_path / "d"), "--json", "--set", "data.buckets=true",
                 "--set", "data.resolution=32", "--set", "data.bucket_step=8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] == 5 and report["trainable"]
    kinds = {p["name"].rsplit("/", 1)[-1]: p["kind"] for p in report["problems"] if p["severity"] == "skipped"}
    assert kinds["bomb.png"] == "too large" and kinds["metadata.jsonl:5"] == "unsafe path"
    assert {img["bucket"] for img in report["images"]} == {"32x32"}


def test_check_exits_non_zero_when_nothing_is_trainable(tmp_path, capsys):
    (tmp_path / "Thumbs.db").write_bytes(b"x")
    assert main(["data", "check", str(tmp_path)]) == 1
    assert "no usable images" in capsys.readouterr().out


def test_check_with_a_config_uses_the_models_tokenizer(tiny_sd, tmp_path, capsys):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x" * 100)  # character-level tokenizer: 100 tokens + 2
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\npath = "{tiny_sd}"\n[data]\npath = "{tmp_path}"\n')
    assert main(["data", "check", str(cfg), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "counted with the model's tokenizer" in out
    assert "102 tokens, limit 77: the last 25 are cut" in out


def test_prepare_writes_a_clean_folder(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    img = Image.new("RGBA", (120, 60), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (30, 0, 90, 60))
    img.save(src / "a.png")
    png(src / "b.jpg", size=(50, 100))
    (src / "b.txt").write_text("own caption")
    (src / ".DS_Store").write_bytes(b"x")
    assert main(["data", "prepare", str(src), str(tmp_path / "out"), "--size", "32",
                 "--caption", "a photo of sks dog", "--min-images", "3"]) == 0
    out = capsys.readouterr().out
    assert "only 2 usable image(s)" in out and ".DS_Store" in out
    rows = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": "a.png", "text": "a photo of sks dog"}, {"file_name": "b.png", "text": "own caption"}]
    a = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert a.shape == (32, 32, 3) and tuple(a[16, 16]) == (255, 0, 0)  # centre crop of the red middle
    assert main(["data", "prepare", str(src), str(tmp_path / "keep"), "--size", "30", "--crop", "keep",
                 "--format", "jpg"]) == 0
    assert Image.open(tmp_path / "keep" / "a.jpg").size == (60, 30)
    assert Image.open(tmp_path / "keep" / "a.jpg").format == "JPEG"


@pytest.mark.slow
def test_training_over_a_messy_folder_completes(tiny_sd, tmp_path, run_config, capsys):
    from difftune import load_config
    from difftune.training.loop import train

    data = tmp_path / "d"
    messy_folder(data)
    png(data / "wide.png", size=(80, 40))
    (data / "wide.txt").write_text("a wide image")
    raw = run_config(tiny_sd, data, tmp_path / "out",
                     data={"buckets": True, "bucket_step": 8, "random_flip": True, "cache_latents": True,
                           "cache_text": True, "caption_dropout": 0.2, "trigger": "sks"},
                     train={"max_steps": 3, "batch_size": 2})
    cfg_path = tmp_path / "run.toml"
    from difftune.config.loader import dump_toml

    cfg_path.write_text(dump_toml(raw))
    assert main(["cache", str(cfg_path)]) == 0
    assert "cache ready for 5 images" in capsys.readouterr().out
    result = train(load_config(data=raw))
    assert result.steps == 3 and all(np.isfinite(loss) for _, loss in result.losses)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| Dataset | 5 images (14 skipped:" in card and "1 too large" in card


def test_prepare_never_writes_over_a_folder_the_source_or_a_file(tmp_path, capsys):
    from difftune.tiny import make_tiny_dataset

    src = make_tiny_dataset(tmp_path / "parent" / "src", n=2, size=40)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "my own caption"}\n')
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(mine, "already holds files"), (tmp_path / "parent", "holds the source folder"),
             (src / "inside", "must be outside the source folder"), (afile, "is a file, not a folder")]
    for dst, expected in cases:
        assert main(["data", "prepare", str(src), str(dst), "--size", "32"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and str(dst) in err[0]
    assert (mine / "metadata.jsonl").read_text() == '{"file_name": "a.png", "text": "my own caption"}\n'
    assert not (src / "inside").exists()
    assert main(["data", "prepare", str(src), str(mine), "--size", "32", "--overwrite"]) == 0
    assert "my own caption" not in (mine / "metadata.jsonl").read_text()


@pytest.mark.parametrize("size", ["0", "-5", "99999"])
def test_prepare_refuses_a_size_that_is_not_one(tmp_path, capsys, size):
    from difftune.tiny import make_tiny_dataset

    src = make_tiny_dataset(tmp_path / "src", n=1, size=16)
    assert main(["data", "prepare", str(src), str(tmp_path / "out"), "--size", size]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"difftune: error: --size: {size} is not a size in pixels from 8 to 8192, e.g. 512"]
    assert not (tmp_path / "out").exists()
