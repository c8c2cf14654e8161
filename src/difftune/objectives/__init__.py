"""Training objectives. Adding one is a new module here plus one registration line below.

Importing this package is cheap: an objective's module (and torch) loads when it is first used.
"""

from __future__ import annotations

import dataclasses

from difftune.errors import ConfigError
from difftune.registry import Registry

#: name → ``build(settings_from_family, train_config) -> Objective``
OBJECTIVES: Registry = Registry("objective")

OBJECTIVES.register_lazy("ddpm", "difftune.objectives.ddpm:build")
OBJECTIVES.register_lazy("flow_match", "difftune.objectives.flow_match:build")

#: ``[train]`` keys that only one objective reads; the others refuse them (:func:`check_train_keys`).
OBJECTIVE_KEYS: dict[str, tuple[str, ...]] = {
    "ddpm": ("snr_gamma", "debiased_estimation", "timestep_min", "timestep_max", "timestep_bias",
             "timestep_bias_multiplier", "timestep_bias_portion", "zero_terminal_snr", "input_perturbation"),
    "flow_match": ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "flow_shift"),
}


def check_train_keys(objective: str, title: str, train) -> None:
    """A ``[train]`` key set away from its default that ``objective`` does not read is refused, naming what applies."""
    defaults = {f.name: f.default for f in dataclasses.fields(train)}
    for other, keys in OBJECTIVE_KEYS.items():
        if other == objective:
            continue
        for key in keys:
            if getattr(train, key) != defaults[key]:
                own = ", ".join(f"train.{k}" for k in OBJECTIVE_KEYS.get(objective, ()))
                raise ConfigError(
                    f"train.{key}: does not apply to {title}, which trains with {objective.replace('_', ' ')} "
                    f"({key} is for {other.replace('_', ' ')} models); unset it. What applies here: {own}"
                )


__all__ = ["OBJECTIVE_KEYS", "OBJECTIVES", "check_train_keys"]
