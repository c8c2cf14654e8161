"""Small JPEG thumbnails of dataset images, made once and kept under the app's state folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SIZES = (96, 160, 256)


def thumbnail(image: Path, cache: Path, size: int) -> Path:
    """A ``size``-pixel (longest side) JPEG of ``image``; rebuilt when the image changes."""
    if size not in SIZES:
        size = SIZES[1]
    stat = image.stat()
    key = hashlib.sha1(f"{image}\0{stat.st_mtime_ns}\0{stat.st_size}\0{size}".encode()).hexdigest()
    out = cache / key[:2] / f"{key}.jpg"
    if out.is_file():
        return out
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = 89_478_485  # the data checks' ceiling: a decompression bomb is refused here too
    with Image.open(image) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
        im = ImageOps.exif_transpose(im)
        im.thumbnail((size, size))
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, "white")
            im = Image.alpha_composite(background, im)
        im = im.convert("RGB")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.{id(im)}.tmp")
        im.save(tmp, "JPEG", quality=85)
        os.replace(tmp, out)  # atomic; a cache needs no fsync (a lost thumbnail is made again)
    return out
