"""The closed world's grammar: its attributes, what is held out of pretraining, and how captions read.

This module is the single source of truth for ``docs/world.md`` (``python scripts/update_readme.py``
regenerates it). Everything else in :mod:`difftune.world` — the renderer, the caption writer, the
judge's heads, the pretraining data — reads its vocabulary from here.

Held out of pretraining, on purpose, so fine-tuning has something new to learn:

- a shape (``star``), a colour (``brown``) and a style (``outline``: the shape drawn as a line);
- some shape/colour *combinations* whose parts are all known (``held_out_pairs``), so the base's
  prompt adherence can be measured on combinations it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Shapes the base is pretrained on, then the held-out one(s).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon", "cross", "heart")
HELD_OUT_SHAPES: tuple[str, ...] = ("star",)

#: Colour name -> sRGB. Hues far apart, so a person (and the judge) names them the same way.
#: (Words whose BPE pieces are other caption words are avoided: "cyan" is "cy" + "an", so turquoise.)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 220, 0),
    "green": (30, 160, 50),
    "turquoise": (0, 200, 210),
    "blue": (30, 60, 230),
    "purple": (140, 40, 200),
    "pink": (255, 120, 190),
}
#: Held-out colour: darker than orange and red, so it is never confused with them.
HELD_OUT_COLOURS: dict[str, tuple[int, int, int]] = {"brown": (120, 70, 25)}

SIZES: tuple[str, ...] = ("small", "large")
#: Radius of the shape's circumscribed circle, as a fraction of the image side.
SIZE_RADIUS: dict[str, float] = {"small": 0.15, "large": 0.27}

POSITIONS: tuple[str, ...] = ("centre", "top left", "top right", "bottom left", "bottom right")

#: Backgrounds: three plain colours and two neutral patterns. ("checkered" would tokenise as
#: "chec" + "ke" + "red", a colour word, so the pattern is a checkerboard.)
BACKGROUNDS: tuple[str, ...] = ("grey", "white", "dark", "striped", "checkerboard")

STYLES: tuple[str, ...] = ("filled",)
HELD_OUT_STYLES: tuple[str, ...] = ("outline",)

ALL_SHAPES = SHAPES + HELD_OUT_SHAPES
ALL_COLOURS = {**COLOURS, **HELD_OUT_COLOURS}
ALL_STYLES = STYLES + HELD_OUT_STYLES

#: Attributes the judge reports, in order, with their possible values (held-out ones included).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ALL_SHAPES,
    "colour": tuple(ALL_COLOURS),
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
    "style": ALL_STYLES,
}


def held_out_pairs() -> tuple[tuple[str, str], ...]:
    """Shape/colour combinations never shown in pretraining (both parts are known on their own).

    One colour per shape, on a diagonal of the shape x colour table, so every known shape and
    every known colour but one is still seen with all the others.
    """
    colours = tuple(COLOURS)
    return tuple((shape, colours[(i + 3) % len(colours)]) for i, shape in enumerate(SHAPES))


# --- captions ------------------------------------------------------------------------------------

#: Ways to say each attribute value. The first phrasing is the canonical one.
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}

BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "grey": ("on a grey background", "on a gray background", "on grey"),
    "white": ("on a white background", "on white"),
    "dark": ("on a dark background", "on a black background", "on black"),
    "striped": ("on a striped background", "on stripes"),
    "checkerboard": ("on a checkerboard background", "on a checkerboard", "on a checked background"),
}

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "centre": ("in the centre", "in the middle", "in the center"),
    "top left": ("top left", "in the top left corner", "at the top left"),
    "top right": ("top right", "in the top right corner", "at the top right"),
    "bottom left": ("bottom left", "in the bottom left corner", "at the bottom left"),
    "bottom right": ("bottom right", "in the bottom right corner", "at the bottom right"),
}

#: How each style is said; {a_thing} is the noun phrase with its article ("a small red star").
STYLE_PHRASES: dict[str, tuple[str, ...]] = {
    "filled": ("{a_thing}",),
    "outline": ("an outline drawing of {a_thing}", "{a_thing} drawn in outline", "{a_thing} in outline"),
}

#: Sentence frames. {np} is the noun phrase with its article, {bg} the background phrase,
#: {pos} the position phrase. Missing parts are dropped with their punctuation.
FRAMES: tuple[str, ...] = (
    "{np} {bg}, {pos}",
    "{np} {pos} {bg}",
    "{np}, {pos}, {bg}",
)

#: How often a caption leaves out each optional attribute (the shape is always named), so short
#: prompts such as "a red circle" are in the training distribution too.
OMIT_PROBABILITY: dict[str, float] = {"colour": 0.1, "size": 0.3, "background": 0.3, "position": 0.3}

#: The colour can also follow the shape: "a circle in red".
COLOUR_AFTER_PROBABILITY = 0.2


@dataclass(frozen=True)
class Vocabulary:
    """The held-out concepts in one place (documentation, data filters and tests read it)."""

    shapes: tuple[str, ...] = HELD_OUT_SHAPES
    colours: tuple[str, ...] = tuple(HELD_OUT_COLOURS)
    styles: tuple[str, ...] = HELD_OUT_STYLES

    def words(self) -> tuple[str, ...]:
        """Words that only held-out concepts use in captions (never in pretraining captions)."""
        return (*self.shapes, *self.colours, "outline")


HELD_OUT = Vocabulary()


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
