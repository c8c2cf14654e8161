"""Everything a run builds before its first step: the model, the data and the optimisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difftune.config.schema import Config
from difftune.data import prior
from difftune.data.pipeline import TrainingData, build_training_data
from difftune.data.sources import Example
from difftune.errors import ConfigError
from difftune.models import resolve_family
from difftune.models.base import Components, ModelFamily
from difftune.training.precision import weight_dtype


@dataclass
class LoadedModel:
    """The base model as loaded, and the class images it made (prior preservation) before training changed it."""

    family: ModelFamily
    components: Components
    class_examples: list[Example]


def load_model(config: Config, device: torch.device, *, is_main: bool = True, barrier=lambda: None,
               log=print) -> LoadedModel:
    """Resolve and load the base model in the frozen-weight dtype; make missing class images with it."""
    family, source = resolve_family(config.model, config.train)
    components = family.load(source, dtype=weight_dtype(config))
    classes = prior.class_examples(config, family, components, device, is_main=is_main, barrier=barrier, log=log)
    return LoadedModel(family, components, classes)


def fill_caches(config: Config, log=print) -> TrainingData:
    """``difftune cache``: load the model and fill the latent and text caches ahead of training."""
    if not (config.data.cache_latents or config.data.cache_text):
        raise ConfigError("data.cache_latents / data.cache_text: both are off, so there is nothing to cache; "
                          "set one of them to true")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(config, device, log=log)
    for module in (model.components.vae, *model.components.text_encoders):
        module.to(device)
    return build_training_data(config, model.family, model.components, class_examples=model.class_examples,
                               log=log, progress=True)
