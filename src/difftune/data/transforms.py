"""Turn an image into a training tensor: orientation, colour mode, resize, crop, flip, [-1, 1]."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

WHITE = (255, 255, 255)


@dataclass
class Prepared:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    flipped: bool


def has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) greyscale to 8-bit ``L``.

    Integer data is scaled by the range its values use (8-, 16- or 32-bit); float data in [0, 1]
    is scaled by 255, anything else is stretched from its minimum to its maximum.
    """
    arr = np.asarray(img).astype(np.float64)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if img.mode == "F":
        if lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif hi > lo:
            arr = (arr - lo) / (hi - lo) * 255.0
    elif hi <= 255 and lo >= 0 and not img.mode.startswith("I;16"):
        pass
    elif hi <= 65535 and lo >= 0:
        arr = arr / 257.0
    elif hi > lo:
        arr = (arr - lo) / (hi - lo) * 255.0
    arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """EXIF orientation applied, first frame of an animation, transparency on ``background``, RGB."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_bit_depth_to_l(img)
    if has_transparency(img):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def open_rgb(image: Any, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Open a path or PIL image and make it an upright RGB image (see :func:`to_rgb`).

    Paths are checked by the data scan first (size read from the header, decompression bombs
    refused), so PIL's own bomb warning is not needed here.
    """
    if isinstance(image, (str, Path)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(image) as img:
                return to_rgb(img, background).copy()
    return to_rgb(image, background)


def crop_box(image_hw: tuple[int, int], size: tuple[int, int], *, center_crop: bool,
             rng: random.Random) -> tuple[tuple[int, int], tuple[int, int]]:
    """The resized (height, width) that covers ``size`` and the (top, left) of the crop in it."""
    h, w = size
    ih, iw = image_hw
    scale = max(h / ih, w / iw)
    new_w, new_h = max(w, round(iw * scale)), max(h, round(ih * scale))
    if center_crop:
        top, left = (new_h - h) // 2, (new_w - w) // 2
    else:
        top, left = rng.randint(0, new_h - h), rng.randint(0, new_w - w)
    return (new_h, new_w), (top, left)


def prepare_image(
    image: Any, size: tuple[int, int], *, center_crop: bool, flip: bool | None = None, rng: random.Random,
    background: tuple[int, int, int] = WHITE, force_flip: bool | None = None,
) -> Prepared:
    """Resize so the image covers ``size`` (height, width), crop to it, optionally flip.

    ``flip`` flips at random (one draw from ``rng``); ``force_flip`` decides it outright.
    """
    img = open_rgb(image, background)
    h, w = size
    orig = (img.height, img.width)
    (new_h, new_w), (top, left) = crop_box(orig, size, center_crop=center_crop, rng=rng)
    if (new_w, new_h) != (img.width, img.height):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    img = img.crop((left, top, left + w, top + h))
    flipped = force_flip if force_flip is not None else bool(flip) and rng.random() < 0.5
    if flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return Prepared(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), orig, (top, left), flipped)
