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


#: Each family's objective and the objective of each pipeline class a model folder may name, known without
#: importing a family (so ``difftune validate`` can refuse keys of the other objective; a contract test keeps
#: them equal to the families' own ``objective`` and ``pipeline_class_names``).
FAMILY_OBJECTIVES = {"sd1": "ddpm", "sd2": "ddpm", "sdxl": "ddpm", "sd3": "flow_match", "flux": "flow_match"}
PIPELINE_OBJECTIVES = {
    "StableDiffusionPipeline": "ddpm", "StableDiffusionImg2ImgPipeline": "ddpm",
    "StableDiffusionXLPipeline": "ddpm", "StableDiffusionXLImg2ImgPipeline": "ddpm",
    "StableDiffusion3Pipeline": "flow_match", "StableDiffusion3Img2ImgPipeline": "flow_match",
    "FluxPipeline": "flow_match", "FluxImg2ImgPipeline": "flow_match",
}


def objective_without_loading(model: ModelConfig) -> tuple[str, str] | None:
    """``(objective, what the model is)`` from ``model.family`` or a local folder's ``model_index.json``, without
    importing torch; ``None`` when only loading can tell (a Hub id or a single file with ``family = "auto"``)."""
    import json
    from pathlib import Path

    if model.family != "auto":
        objective = FAMILY_OBJECTIVES.get(model.family)
        return (objective, f"model.family = {model.family!r}") if objective else None
    from difftune.bases import is_builtin, resolve

    index = Path(resolve(model.path) if is_builtin(model.path) else model.path).expanduser() / "model_index.json"
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    objective = PIPELINE_OBJECTIVES.get(name)
    return (objective, f"{model.path} (a {name})") if objective else None


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


__all__ = ["FAMILIES", "FAMILY_OBJECTIVES", "PIPELINE_OBJECTIVES", "detect_family", "get_family", "load_pipeline",
           "objective_without_loading", "resolve_family"]
