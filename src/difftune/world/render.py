"""Draw a :class:`~difftune.world.scene.Scene` as an RGB image (PIL + numpy, deterministic).

Shapes are polygons in unit coordinates (radius 1 around the origin), drawn at 4x the target
size and box-filtered down, which anti-aliases every edge the same way on every machine.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from difftune.world import grammar as g
from difftune.world.scene import Scene

SUPERSAMPLE = 4
#: Width of the outline style's line, as a fraction of the image side.
OUTLINE_WIDTH = 0.05

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (245, 245, 245),
    "dark": (24, 24, 30),
}
#: Two neutral tones per pattern, so a pattern never reads as a colour.
PATTERN_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "striped": ((215, 215, 215), (150, 150, 150)),
    "checkerboard": ((175, 175, 175), (85, 85, 85)),
}
#: Pattern period as a fraction of the image side: diagonal stripes repeat every 12.8 px along a
#: row at 64 px (each stripe about 4.5 px wide), checkerboard cells are 8 px.
PATTERN_PERIOD = {"striped": 1 / 5, "checkerboard": 1 / 8}


def _regular(n: int, start_deg: float, radius: float = 1.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start_deg + 360 * k / n)),
             radius * math.sin(math.radians(start_deg + 360 * k / n))) for k in range(n)]


def _star() -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.42
        a = math.radians(-90 + 36 * k)
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


def _heart() -> list[tuple[float, float]]:
    points = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        points.append((x / 17.0, (y + 2.5) / 17.0))
    return points


def _cross(arm: float = 0.34) -> list[tuple[float, float]]:
    a, r = arm, 0.92
    return [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a),
            (-a, -a)]


#: Unit outlines (y grows downwards, as in images). A circle is a 96-gon.
OUTLINES: dict[str, list[tuple[float, float]]] = {
    "circle": _regular(96, 0.0, 0.9),
    "square": [(-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72)],
    "triangle": [(x, y + 0.18) for x, y in _regular(3, -90.0, 1.0)],
    "diamond": [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)],
    "hexagon": _regular(6, 0.0, 0.92),
    "cross": _cross(),
    "heart": _heart(),
    "star": _star(),
}
assert set(OUTLINES) == set(g.ALL_SHAPES)


def centre_of(scene: Scene) -> tuple[float, float]:
    """Centre of the shape as fractions of the side (before the small random shift)."""
    radius = g.SIZE_RADIUS[scene.size]
    near, far = 0.06 + radius, 0.94 - radius
    x = {"left": near, "right": far}.get(scene.position.split()[-1], 0.5)
    y = {"top": near, "bottom": far}.get(scene.position.split()[0], 0.5)
    return x + scene.dx, y + scene.dy


def shape_polygon(scene: Scene, side: float) -> list[tuple[float, float]]:
    """The shape's outline in pixel coordinates of an image ``side`` pixels wide."""
    cx, cy = centre_of(scene)
    radius = g.SIZE_RADIUS[scene.size] * scene.scale * side
    a = math.radians(scene.rotation)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx * side + radius * (x * ca - y * sa), cy * side + radius * (x * sa + y * ca))
            for x, y in OUTLINES[scene.shape]]


@lru_cache(maxsize=16)
def background_image(name: str, side: int) -> Image.Image:
    if name in BACKGROUND_COLOURS:
        return Image.new("RGB", (side, side), BACKGROUND_COLOURS[name])
    light, dark = PATTERN_COLOURS[name]
    period = PATTERN_PERIOD[name] * side
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64) + 0.5
    if name == "striped":  # diagonal stripes, half light, half dark
        on = ((xx + yy) / period) % 1.0 < 0.5
    else:
        on = ((np.floor(xx / period) + np.floor(yy / period)) % 2) == 0
    pixels = np.where(on[..., None], np.array(light, np.uint8), np.array(dark, np.uint8))
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image (64 and 128 are the documented sizes)."""
    big = size * SUPERSAMPLE
    image = background_image(scene.background, big).copy()
    draw = ImageDraw.Draw(image)
    polygon = shape_polygon(scene, big)
    colour = g.ALL_COLOURS[scene.colour]
    if scene.style == "filled":
        draw.polygon(polygon, fill=colour)
    else:
        width = max(1, round(OUTLINE_WIDTH * big))
        draw.line([*polygon, polygon[0], polygon[1]], fill=colour, width=width, joint="curve")
    return image.resize((size, size), Image.BOX)


def render_seed(seed: int, size: int = 64) -> tuple[Image.Image, Scene]:
    """The pretraining-pool scene of ``seed`` and its image."""
    scene = Scene.from_seed(seed)
    return render(scene, size), scene
