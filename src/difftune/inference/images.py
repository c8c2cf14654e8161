"""Images out of a pipeline: the grid that ``difftune generate`` and validation samples save."""

from __future__ import annotations

from PIL import Image


def make_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Images in rows of ``cols``; cells are as large as the largest image (sizes may differ)."""
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    w, h = max(i.size[0] for i in images), max(i.size[1] for i in images)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid
