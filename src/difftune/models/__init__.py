"""Model families. Adding one is a new module here plus one registration line below."""

from difftune.compat import require_working_stack

require_working_stack()  # a known-broken install stops here, saying what to install

from difftune.models import flux, sd, sd3, sdxl
from difftune.models.base import Components, ModelFamily, ModelSource
from difftune.registry import Registry

FAMILIES: Registry[type[ModelFamily]] = Registry("model family")

sd.register(FAMILIES)
sdxl.register(FAMILIES)
sd3.register(FAMILIES)
flux.register(FAMILIES)


def get_family(name: str, config=None) -> ModelFamily:
    """An instance of the family ``name``; ``config`` (the run's Config) carries its load and training options."""
    return FAMILIES.get(name)(config)


def detect_family_for(source: ModelSource, requested: str = "auto") -> str:
    from difftune.models.loading import detect_family

    return detect_family(source, requested)


__all__ = ["FAMILIES", "Components", "ModelFamily", "ModelSource", "detect_family_for", "get_family"]
