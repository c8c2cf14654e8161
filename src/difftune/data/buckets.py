"""Aspect-ratio buckets: a set of training sizes of about ``resolution``² pixels."""

from __future__ import annotations

import math


def make_buckets(resolution: int, step: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(height, width) sizes with sides that are multiples of ``step`` and area at most ``resolution``².

    For every width, the tallest height that fits the area is kept; the square ``resolution``
    bucket is always present. Ratios beyond ``max_ratio`` are left out.
    """
    area = resolution * resolution
    out = {(resolution, resolution)}
    w = step
    while w <= area // step:
        h = (area // w) // step * step
        if h >= step and max(h / w, w / h) <= max_ratio:
            out.add((h, w))
        w += step
    return sorted(out, key=lambda hw: (hw[1] / hw[0], hw))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size`` (height, width), in log space."""
    ratio = math.log(size[1] / size[0])
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - ratio), -hw[0] * hw[1]))


def bucket_label(hw: tuple[int, int]) -> str:
    return f"{hw[1]}x{hw[0]}"
