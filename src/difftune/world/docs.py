"""The grammar section of docs/world.md, generated from :mod:`difftune.world.grammar`."""

from __future__ import annotations

from difftune.world import grammar as g
from difftune.world.scene import Scene, caption


def _codes(values) -> str:
    return ", ".join(f"`{v}`" for v in values)


def grammar_markdown() -> str:
    colours = ", ".join(f"`{name}` ({r}, {gr}, {b})" for name, (r, gr, b) in g.COLOURS.items())
    held_colours = ", ".join(f"`{name}` ({r}, {gr}, {b})" for name, (r, gr, b) in g.HELD_OUT_COLOURS.items())
    lines = [
        "| attribute | pretraining values | held out of pretraining |",
        "|---|---|---|",
        f"| shape | {_codes(g.SHAPES)} | {_codes(g.HELD_OUT_SHAPES)} |",
        f"| colour (sRGB) | {colours} | {held_colours} |",
        f"| size | {_codes(g.SIZES)} (radius {', '.join(f'{v:g}' for v in g.SIZE_RADIUS.values())} of the side) | |",
        f"| position | {_codes(g.POSITIONS)} | |",
        f"| background | {_codes(g.BACKGROUNDS)} | |",
        f"| style | {_codes(g.STYLES)} | {_codes(g.HELD_OUT_STYLES)} (the shape drawn as a line) |",
        "",
        "Held-out shape/colour combinations (each part is seen in pretraining, the pair never is): "
        + ", ".join(f"{colour} {shape}" for shape, colour in g.held_out_pairs()) + ".",
        "",
        "Uncaptioned pose: every shape but the circle is turned up to ±12°, shifted up to 3 % of the side "
        "and scaled by 0.92–1.08.",
        "",
        "Phrasings (the first is canonical):",
        "",
        "| attribute | value | phrasings |",
        "|---|---|---|",
    ]
    for value, words in g.SIZE_WORDS.items():
        lines.append(f"| size | `{value}` | {' / '.join(words)} |")
    lines.append("| colour | any | `a red circle` / `a circle in red` |")
    for value, phrases in g.BACKGROUND_PHRASES.items():
        lines.append(f"| background | `{value}` | {' / '.join(phrases)} |")
    for value, phrases in g.POSITION_PHRASES.items():
        lines.append(f"| position | `{value}` | {' / '.join(phrases)} |")
    for value, phrases in g.STYLE_PHRASES.items():
        lines.append(f"| style | `{value}` | {' / '.join(p.replace('{a_thing}', '…') for p in phrases)} |")
    omitted = ", ".join(f"{k} {v:.0%}" for k, v in g.OMIT_PROBABILITY.items())
    lines += [
        "",
        f"Sentence frames: {' / '.join(f'`{f}`' for f in g.FRAMES)}. A caption always names the shape and "
        f"leaves out each other attribute with probability {omitted}.",
        "",
        "Examples:",
        "",
    ]
    for seed in range(6):
        lines.append(f"- {caption(Scene.from_seed(seed), seed)}")
    return "\n".join(lines)
