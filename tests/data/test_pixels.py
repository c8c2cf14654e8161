"""Orientation, transparency and colour modes, checked at the pixel level."""

from __future__ import annotations

import numpy as np
from PIL import Image

from difftune.config.resolve import parse_colour
from difftune.data.transforms import open_rgb


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 tall: left half red, right half blue. Orientation 6 = rotate 90° clockwise
    # for display, so the upright image is 20 wide x 40 tall with red on top.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "r.png", exif=exif)
    out = np.asarray(open_rgb(tmp_path / "r.png"))
    assert out.shape == (40, 20, 3)
    assert tuple(out[5, 10]) == (255, 0, 0) and tuple(out[35, 10]) == (0, 0, 255)


def test_rgba_is_composited_on_the_background_not_black(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (255, 0, 0, 255)  # opaque red left, fully transparent right
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    white = np.asarray(open_rgb(tmp_path / "a.png"))
    assert tuple(white[0, 0]) == (255, 0, 0) and tuple(white[0, 9]) == (255, 255, 255)
    grey = np.asarray(open_rgb(tmp_path / "a.png", parse_colour("#808080")))
    assert tuple(grey[0, 9]) == (128, 128, 128)


def test_la_and_palette_transparency(tmp_path):
    la = Image.new("LA", (4, 4), (0, 0))
    la.save(tmp_path / "la.png")
    assert tuple(np.asarray(open_rgb(tmp_path / "la.png", (0, 255, 0)))[0, 0]) == (0, 255, 0)
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.save(tmp_path / "p.png", transparency=1)
    assert tuple(np.asarray(open_rgb(tmp_path / "p.png"))[0, 0]) == (255, 255, 255)


def test_cmyk_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    r, g, b = np.asarray(open_rgb(tmp_path / "c.jpg"))[4, 4].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_high_bit_depth_greyscale(tmp_path):
    arr16 = np.full((8, 8), 65535 // 2, np.uint16)
    Image.fromarray(arr16).save(tmp_path / "g16.png")
    out = np.asarray(open_rgb(tmp_path / "g16.png"))
    assert out.dtype == np.uint8 and abs(int(out[0, 0, 0]) - 127) <= 1
    f = Image.fromarray(np.full((8, 8), 0.5, np.float32), "F")
    assert abs(int(np.asarray(open_rgb(f))[0, 0, 0]) - 128) <= 1
    i32 = Image.fromarray(np.full((8, 8), 1000, np.int32), "I")
    assert abs(int(np.asarray(open_rgb(i32))[0, 0, 0]) - round(1000 / 257)) <= 1


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "a.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    for name in ("a.gif", "a.webp"):
        r, g, b = np.asarray(open_rgb(tmp_path / name))[4, 4].astype(int)
        assert r > 200 and b < 60, name
