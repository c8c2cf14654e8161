"""A small closed world of captioned images, the judge that reads them, and the tools that built the
embedded base ``difftune:shapes`` (docs/world.md).

    >>> from difftune.world import Scene, render, caption
    >>> scene = Scene("circle", "red", "small", "top left", "grey")
    >>> caption(scene, full=True)
    'a small red circle on a grey background, top left'
    >>> image = render(scene)          # a 64 x 64 PIL image

Kept apart from training: ``difftune.training`` and ``difftune.models`` never import it.
"""

from difftune.world.render import render
from difftune.world.scene import EVERYTHING, PRETRAINING, Pool, Scene, caption


def __getattr__(name: str):
    # The judge needs torch; keep `import difftune.world` light.
    if name == "Judge":
        from difftune.world.judge import Judge

        return Judge
    raise AttributeError(name)


__all__ = ["EVERYTHING", "PRETRAINING", "Judge", "Pool", "Scene", "caption", "render"]
