"""Model families. Adding one is a new module here plus one registration line below."""

from difftune.models import sd
from difftune.models.base import Components, ModelFamily, ModelSource
from difftune.registry import Registry

FAMILIES: Registry[type[ModelFamily]] = Registry("model family")

sd.register(FAMILIES)


def get_family(name: str) -> ModelFamily:
    return FAMILIES.get(name)()


def detect_family_for(source: ModelSource, requested: str = "auto") -> str:
    from difftune.models.loading import detect_family

    return detect_family(source, requested)


__all__ = ["FAMILIES", "Components", "ModelFamily", "ModelSource", "detect_family_for", "get_family"]
