"""The few torchvision transforms diffusers' LoRA example uses, on PIL images and NumPy."""

from __future__ import annotations

import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = Image.Resampling.NEAREST
    BILINEAR = Image.Resampling.BILINEAR
    BICUBIC = Image.Resampling.BICUBIC
    LANCZOS = Image.Resampling.LANCZOS
    BOX = Image.Resampling.BOX
    HAMMING = Image.Resampling.HAMMING


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    """Resize the shorter side to ``size``, keeping the aspect ratio."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size = size
        self.resample = (interpolation or InterpolationMode.BILINEAR).value

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w <= h:
            return img.resize((self.size, max(1, round(h * self.size / w))), self.resample)
        return img.resize((max(1, round(w * self.size / h)), self.size), self.resample)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        left, top = random.randint(0, w - self.size), random.randint(0, h - self.size)
        return img.crop((left, top, left + self.size, top + self.size))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random.random() < self.p else img


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class ToTensor:
    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean[0], std[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
