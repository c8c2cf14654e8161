"""A scene (what one image shows), drawn at random from the grammar, and its English caption.

Everything is a pure function of a seed: ``Scene.from_seed(7)`` and ``caption(scene, seed=7)``
give the same result on every machine.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

from difftune.world import grammar as g


@dataclass(frozen=True)
class Scene:
    """One object on a background. ``rotation`` (degrees), ``dx``/``dy`` (fractions of the side)
    and ``scale`` are small uncaptioned variations of pose; the judge ignores them."""

    shape: str = "circle"
    colour: str = "red"
    size: str = "large"
    position: str = "centre"
    background: str = "grey"
    style: str = "filled"
    rotation: float = 0.0
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name, values in g.ATTRIBUTES.items():
            value = getattr(self, name)
            if value not in values:
                raise ValueError(f"{name}: {value!r} is not one of {', '.join(values)}")

    @classmethod
    def from_seed(cls, seed: int, pool: Pool | None = None) -> Scene:
        """A scene drawn from ``pool`` (default: the pretraining pool) with ``random.Random(seed)``."""
        return (pool or PRETRAINING).sample(random.Random(f"scene/{seed}"))

    def attributes(self) -> dict[str, str]:
        """The judged attributes (shape, colour, size, position, background, style)."""
        return {name: getattr(self, name) for name in g.ATTRIBUTES}

    def with_(self, **changes) -> Scene:
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Pool:
    """The values a random scene may take, and the shape/colour pairs it must avoid."""

    shapes: tuple[str, ...] = g.SHAPES
    colours: tuple[str, ...] = tuple(g.COLOURS)
    sizes: tuple[str, ...] = g.SIZES
    positions: tuple[str, ...] = g.POSITIONS
    backgrounds: tuple[str, ...] = g.BACKGROUNDS
    styles: tuple[str, ...] = g.STYLES
    excluded_pairs: tuple[tuple[str, str], ...] = ()
    #: Maximum rotation in degrees either way (circles are not rotated: it would not show).
    max_rotation: float = 12.0
    max_shift: float = 0.03
    scale_range: tuple[float, float] = (0.92, 1.08)

    def sample(self, rng: random.Random) -> Scene:
        while True:
            shape, colour = rng.choice(self.shapes), rng.choice(self.colours)
            if (shape, colour) not in self.excluded_pairs:
                break
        return Scene(
            shape=shape,
            colour=colour,
            size=rng.choice(self.sizes),
            position=rng.choice(self.positions),
            background=rng.choice(self.backgrounds),
            style=rng.choice(self.styles),
            rotation=0.0 if shape == "circle" else rng.uniform(-self.max_rotation, self.max_rotation),
            dx=rng.uniform(-self.max_shift, self.max_shift),
            dy=rng.uniform(-self.max_shift, self.max_shift),
            scale=rng.uniform(*self.scale_range),
        )

    def allows(self, scene: Scene) -> bool:
        return (scene.shape in self.shapes and scene.colour in self.colours and scene.size in self.sizes
                and scene.position in self.positions and scene.background in self.backgrounds
                and scene.style in self.styles and (scene.shape, scene.colour) not in self.excluded_pairs)


#: What the base is pretrained on: known shapes, colours and styles, minus the held-out pairs.
PRETRAINING = Pool(excluded_pairs=g.held_out_pairs())
#: Everything, held-out concepts included (the judge learns from this).
EVERYTHING = Pool(shapes=g.ALL_SHAPES, colours=tuple(g.ALL_COLOURS), styles=g.ALL_STYLES)


def caption(scene: Scene, seed: int | None = None, *, rng: random.Random | None = None,
            shape_word: str | None = None, full: bool = False) -> str:
    """An English caption for ``scene``, e.g. ``"a small red circle on a grey background, top left"``.

    Phrasing and which optional attributes are mentioned are drawn from ``rng`` (or from ``seed``);
    ``full=True`` mentions every attribute with canonical words. ``shape_word`` replaces the
    shape's name (a trigger word for a new concept).
    """
    rng = rng or random.Random(f"caption/{seed}")
    noun = shape_word or scene.shape

    def said(attribute: str) -> bool:
        return full or rng.random() >= g.OMIT_PROBABILITY[attribute]

    def pick(options: tuple[str, ...]) -> str:
        return options[0] if full else rng.choice(options)

    adjectives = []
    colour_after = False
    if said("size"):
        adjectives.append(pick(g.SIZE_WORDS[scene.size]))
    if said("colour"):
        if not full and rng.random() < g.COLOUR_AFTER_PROBABILITY:
            colour_after = True
        else:
            adjectives.append(scene.colour)
    thing = " ".join([*adjectives, noun]) + (f" in {scene.colour}" if colour_after else "")
    a_thing = f"{g.article(thing)} {thing}"
    np = pick(g.STYLE_PHRASES[scene.style]).format(a_thing=a_thing)
    bg = pick(g.BACKGROUND_PHRASES[scene.background]) if said("background") else ""
    pos = pick(g.POSITION_PHRASES[scene.position]) if said("position") else ""
    frame = g.FRAMES[0] if full else rng.choice(g.FRAMES)
    return _fill(frame, np=np, bg=bg, pos=pos)


def _fill(frame: str, **parts: str) -> str:
    """Fill ``frame``, dropping empty parts together with the separator before them."""
    text = frame
    for name, value in parts.items():
        if not value:
            for sep in (", ", " "):
                text = text.replace(sep + "{" + name + "}", "")
    text = text.format(**parts)
    return " ".join(text.split()).strip(" ,")
