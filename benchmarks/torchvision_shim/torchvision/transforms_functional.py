"""``torchvision.transforms.functional.crop``, which diffusers' SDXL LoRA example imports (PIL images)."""

from __future__ import annotations

from PIL import Image


def crop(img: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    return img.crop((left, top, left + width, top + height))
