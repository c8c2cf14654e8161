"""Training objectives. Adding one is a new module here plus one registration line below."""

from difftune.objectives import ddpm, flow_match
from difftune.objectives.base import NoisedBatch, Objective
from difftune.registry import Registry

#: name → ``build(settings_from_family, train_config) -> Objective``
OBJECTIVES: Registry = Registry("objective")

OBJECTIVES.register("ddpm")(ddpm.build)
OBJECTIVES.register("flow_match")(flow_match.build)

__all__ = ["OBJECTIVES", "NoisedBatch", "Objective"]
