"""Model families. Adding one is a new module here plus one registration line below.

Importing this package is cheap: a family's module (and torch) loads when the family is first used.
"""

from __future__ import annotations

from difftune.compat import require_working_stack

require_working_stack()  # a known-broken install stops here, saying what to install

from typing import TYPE_CHECKING

from difftune.errors import DifftuneError
from difftune.registry import Registry

if TYPE_CHECKING:
    from difftune.config.schema import ModelConfig, TrainConfig
    from difftune.models.base import ModelFamily, ModelSource

FAMILIES: Registry[type[ModelFamily]] = Registry("model family")

FAMILIES.register_lazy("sd1", "difftune.models.sd:StableDiffusion")
FAMILIES.register_lazy("sd2", "difftune.models.sd:StableDiffusion2")
FAMILIES.register_lazy("sdxl", "difftune.models.sdxl:StableDiffusionXL")
FAMILIES.register_lazy("sd3", "difftune.models.sd3:StableDiffusion3")
FAMILIES.register_lazy("flux", "difftune.models.flux:Flux")


def get_family(name: str, model: ModelConfig | None = None, train: TrainConfig | None = None) -> ModelFamily:
    """An instance of the family ``name`` with the run's ``[model]`` (load options) and ``[train]`` sections."""
    return FAMILIES.get(name)(model, train)


def detect_family(source: ModelSource, requested: str = "auto") -> str:
    """The family name for ``source``: ``requested`` if given, else the first family that matches."""
    from difftune.models.loading import single_file_type

    if requested != "auto":
        return requested
    sf_type = single_file_type(source)
    for name in FAMILIES.names():
        if FAMILIES.get(name).matches(source, sf_type):
            return name
    if source.kind == "single_file" and sf_type is None:
        raise DifftuneError(
            f"model.path: could not tell which model family {source.path} is: its tensor names are not a "
            "known single-file model layout (is it a LoRA or a partial checkpoint?). If it is a full model, "
            f"set model.family to one of {', '.join(FAMILIES.names())}"
        )
    what = source.pipeline_class_name or sf_type or "unknown"
    raise DifftuneError(
        f"model.path: could not tell which model family {source.path} is (found {what}); "
        f"set model.family to one of {', '.join(FAMILIES.names())}"
    )


def resolve_family(model: ModelConfig, train: TrainConfig | None = None) -> tuple[ModelFamily, ModelSource]:
    """The family of ``model.path`` and where its files are (nothing is loaded but configs)."""
    from difftune.models.loading import resolve_source

    source = resolve_source(model.path, model.revision, model.variant, model.config)
    return get_family(detect_family(source, model.family), model, train), source


def load_pipeline(path: str, family_name: str = "auto", dtype=None):
    """A base model as an inference pipeline, loaded by its family; ``(pipeline, family, components)``."""
    import torch

    from difftune.config.schema import ModelConfig

    family, source = resolve_family(ModelConfig(path=path, family=family_name))
    components = family.load(source, dtype=dtype or torch.float32)
    return family.build_pipeline(components, components.denoiser, components.text_encoders), family, components


__all__ = ["FAMILIES", "detect_family", "get_family", "load_pipeline", "resolve_family"]
