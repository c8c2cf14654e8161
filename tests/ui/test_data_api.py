"""Data: the same report as `difftune data check`, thumbnails, and captions edited where they are read from."""

from __future__ import annotations

import io
import json

from PIL import Image

from difftune.data.caption_edit import set_caption


def test_report_is_difftune_data_check(served, ui_root, capsys):
    folder = ui_root / "data" / "shapes"
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.docx").write_bytes(b"PK\x03\x04")
    from difftune.cli import main

    main(["data", "check", "data/shapes", "--json", "--set", "data.resolution=256"])
    cli = json.loads(capsys.readouterr().out)
    report = served.client.post("/api/data/check", {"path": "data/shapes", "set": ["data.resolution=256"]})
    assert report["usable"] == cli["usable"] == 4
    assert report["images"] == cli["images"]
    assert [(p["kind"], p["severity"]) for p in report["problems"]] == [(p["kind"], p["severity"]) for p in cli["problems"]]
    names = {p["name"].split("/")[-1]: p for p in report["problems"]}
    assert names["broken.png"]["severity"] == "skipped" and names["notes.docx"]["kind"] == "not an image"
    assert report["buckets"]["resolution"] == 256
    status, data = served.client.request("/api/data/check", {"path": "data/shapes", "set": ["data.resolutoin=1"]})
    assert status == 400 and "did you mean data.resolution" in data["error"]


def test_a_page_can_poll_the_check_instead_of_waiting(served):
    import time

    c = served.client
    state = c.post("/api/data/check", {"path": "data/shapes", "wait": False})
    deadline = time.monotonic() + 60
    while state["status"] != "ready":
        assert state == {"status": "checking"} and time.monotonic() < deadline
        time.sleep(0.1)
        state = c.post("/api/data/check", {"path": "data/shapes", "wait": False})
    assert state["report"] == c.post("/api/data/check", {"path": "data/shapes"})
    body = {"path": "data/shapes", "wait": False, "set": ["data.nope=1"]}
    status, state = c.request("/api/data/check", body)
    while status == 200 and state == {"status": "checking"} and time.monotonic() < deadline:
        time.sleep(0.1)
        status, state = c.request("/api/data/check", body)
    assert status == 400 and state["error"].startswith("--set data.nope: unknown key")


def test_folders_and_thumbnails(served, ui_root):
    listing = served.client.get("/api/folders?path=data")
    assert listing["folders"] == [{"name": "shapes", "path": "data/shapes", "images": 4}]
    raw = served.client.get("/thumb?size=96&path=data/shapes/img_000.png")
    thumb = Image.open(io.BytesIO(raw))
    assert thumb.format == "JPEG" and max(thumb.size) == 64  # never enlarged
    big = ui_root / "data" / "big.png"
    Image.new("RGB", (900, 300), "red").save(big)
    thumb = Image.open(io.BytesIO(served.client.get("/thumb?size=160&path=data/big.png")))
    assert thumb.size == (160, 53)
    (ui_root / "data" / "fake.png").write_text("not an image")
    assert served.client.request("/thumb?path=data/fake.png")[0] == 415
    files = served.client.get("/api/data/files?path=data")["images"]
    assert files == ["big.png", "fake.png"] + [f"shapes/img_{i:03d}.png" for i in range(4)]
    image = served.client.get("/file?path=data/shapes/img_001.png")
    assert image == (ui_root / "data" / "shapes" / "img_001.png").read_bytes()


def test_caption_edit_changes_only_that_metadata_line(served, ui_root):
    meta = ui_root / "data" / "shapes" / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    rows[1]["extra"] = "kept"
    meta.write_text("\n".join([lines[0], json.dumps(rows[1]), *lines[2:]]) + "\n")
    before = meta.read_text().splitlines()
    served.client.post("/api/data/check", {"path": "data/shapes"})  # cached now
    res = served.client.post("/api/data/caption", {"path": "data/shapes", "name": rows[1]["file_name"],
                                                   "caption": "  a very green square  "})
    assert res == {"file": "data/shapes/metadata.jsonl", "caption": "a very green square"}
    after = meta.read_text().splitlines()
    assert [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b] == [1]
    assert json.loads(after[1]) == {**rows[1], "text": "a very green square"}
    report = served.client.post("/api/data/check", {"path": "data/shapes"})
    assert report["images"][1]["caption"] == "a very green square"  # the cache saw the change
    status, data = served.client.request("/api/data/caption", {"path": "data/shapes", "name": "img_000.png",
                                                               "caption": "two\nlines"})
    assert status == 400 and "one line" in data["error"]


def test_sidecar_captions(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32)).save(folder / name)
    (folder / "a.txt").write_text("old\n")
    assert set_caption(folder, "a.png", "new") == folder / "a.txt"
    assert (folder / "a.txt").read_text() == "new\n"
    assert set_caption(folder, "b.png", "first") == folder / "b.txt"  # no metadata file: a new sidecar
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "meta"}')  # no final newline
    assert set_caption(folder, "a.png", "meta 2") == folder / "metadata.jsonl"  # the metadata line wins
    assert (folder / "a.txt").read_text() == "new\n"
    Image.new("RGB", (32, 32)).save(folder / "c.png")
    assert set_caption(folder, "c.png", "appended") == folder / "metadata.jsonl"
    assert (folder / "metadata.jsonl").read_text() == (
        '{"file_name": "a.png", "text": "meta 2"}\n{"file_name": "c.png", "text": "appended"}\n')
    assert set_caption(folder, "b.png", "still the sidecar") == folder / "b.txt"  # has a sidecar, no line
