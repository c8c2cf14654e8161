"""Training objectives. Adding one is a new module here plus one registration line below.

Importing this package is cheap: an objective's module (and torch) loads when it is first used.
"""

from difftune.registry import Registry

#: name → ``build(settings_from_family, train_config) -> Objective``
OBJECTIVES: Registry = Registry("objective")

OBJECTIVES.register_lazy("ddpm", "difftune.objectives.ddpm:build")
OBJECTIVES.register_lazy("flow_match", "difftune.objectives.flow_match:build")

__all__ = ["OBJECTIVES"]
