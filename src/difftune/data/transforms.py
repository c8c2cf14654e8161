"""Turn an image into a training tensor: resize, crop, flip, normalise to [-1, 1]."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps


@dataclass
class Prepared:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    flipped: bool


def open_rgb(image: Any) -> Image.Image:
    """Open a path or PIL image, apply EXIF orientation and convert to RGB."""
    img = Image.open(image) if isinstance(image, (str, Path)) else image
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def prepare_image(
    image: Any, size: tuple[int, int], *, center_crop: bool, flip: bool, rng: random.Random
) -> Prepared:
    """Resize so the image covers ``size`` (height, width), crop to it, optionally flip."""
    img = open_rgb(image)
    h, w = size
    orig = (img.height, img.width)
    scale = max(h / img.height, w / img.width)
    new_w, new_h = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    if (new_w, new_h) != (img.width, img.height):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if center_crop:
        top, left = (new_h - h) // 2, (new_w - w) // 2
    else:
        top, left = rng.randint(0, new_h - h), rng.randint(0, new_w - w)
    img = img.crop((left, top, left + w, top + h))
    flipped = flip and rng.random() < 0.5
    if flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return Prepared(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), orig, (top, left), flipped)
