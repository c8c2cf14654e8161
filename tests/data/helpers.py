"""Generators of good and bad files for the data tests."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png(path: Path, size=(40, 40), colour=(200, 30, 30), mode="RGB") -> Path:
    Image.new(mode, size, colour).save(path)
    return path


def bomb_png(path: Path, width=100_000, height=100_000) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def messy_folder(root: Path) -> dict[str, str]:
    """Good images plus one of every kind of bad file; returns {file name: expected problem kind}."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        png(root / f"good{i}.png", colour=(40 * i, 100, 200))
        (root / f"good{i}.txt").write_text(f"a good image {i}", encoding="utf-8")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "notes.txt").write_text("stray text")
    (root / "empty.png").write_bytes(b"")
    truncated_jpeg(root / "truncated.jpg")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (root / "fake.jpg").write_text("I am text")
    png(root / "tiny.png", size=(8, 8))
    bomb_png(root / "bomb.png")
    (root / "metadata.jsonl").write_text("\n".join([
        json.dumps({"file_name": "good0.png", "text": "from metadata"}),
        "{not json",
        json.dumps({"text": "no file name"}),
        json.dumps({"file_name": "missing.png", "text": "x"}),
        json.dumps({"file_name": "../outside.png", "text": "x"}),
        json.dumps({"file_name": "/etc/passwd", "text": "x"}),
    ]) + "\n")
    return {
        ".DS_Store": "not an image", "Thumbs.db": "not an image", "notes.txt": "not an image",
        "empty.png": "empty file", "truncated.jpg": "corrupt image", "corrupt.png": "not an image",
        "fake.jpg": "not an image", "tiny.png": "too small", "bomb.png": "too large",
        "metadata.jsonl:2": "malformed metadata", "metadata.jsonl:3": "malformed metadata",
        "metadata.jsonl:4": "missing file", "metadata.jsonl:5": "unsafe path", "metadata.jsonl:6": "unsafe path",
    }
