"""A run config as difftune loads it: read and checked by :mod:`difftune.config` (which knows nothing
else), then checked against what is registered — the model family, the method, and the method's own
rules. Nothing here imports torch, so ``difftune validate`` is instant.
"""

from __future__ import annotations

from pathlib import Path

from difftune.bases import builtin_path, is_builtin
from difftune.config.loader import Registered, parse_config
from difftune.config.schema import Config
from difftune.errors import ConfigError
from difftune.methods import METHODS
from difftune.methods.rules import check_keys
from difftune.models import FAMILIES, objective_without_loading
from difftune.objectives import check_train_keys


def registered_choices() -> Registered:
    """The names each ``registry`` field of the schema may take (``model.family``, ``method.type``)."""
    return {"families": FAMILIES.names(), "methods": METHODS.names()}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None, check_paths: bool = True) -> Config:
    """Load, override and validate a config: every key, type, range, path and method rule, no weights.

    ``path`` is a TOML file, or ``data`` a mapping of sections; ``overrides`` are ``section.key=value``
    strings (``--set``). Raises :class:`~difftune.errors.ConfigError` with a one-line reason.
    """
    config = parse_config(path, overrides, data, check_paths, registered=registered_choices())
    check_method(config)
    if check_paths and is_builtin(config.model.path):
        builtin_path(config.model.path)  # an unknown built-in name, or its files missing: one clear line
    known = objective_without_loading(config.model)
    if known is not None:  # else checked when training starts, once the family is resolved
        check_train_keys(known[0], known[1], config.train)
    return config


def check_method(config: Config) -> None:
    """The method's own rules, whether it uses prior preservation when that is configured, and whether its
    trained weights allow a quantised or offloaded denoiser."""
    spec = METHODS.get(config.method.type)
    check_keys(config.method, spec.keys, {name: METHODS.get(name).keys for name in METHODS.names()})
    spec.check(config.method)
    if spec.trains_denoiser_weights and config.model.quantize != "none":
        raise ConfigError(f'model.quantize: "{config.model.quantize}" with method.type = {config.method.type!r}, '
                          "which trains the denoiser's own weights; they cannot be quantised. Use a LoRA method "
                          'or quantize = "none"')
    if spec.trains_denoiser_weights and config.model.offload != "none":
        raise ConfigError(f'model.offload: "{config.model.offload}" offloads frozen weights; with method.type = '
                          f"{config.method.type!r} every denoiser weight trains. Use a LoRA method or offload = \"none\"")
    if config.prior_preservation.enabled and not spec.supports_prior_preservation:
        supported = " or ".join(f'"{n}"' for n in METHODS.names() if METHODS.get(n).supports_prior_preservation)
        raise ConfigError(
            f"prior_preservation.{'class_prompt' if config.prior_preservation.class_prompt else 'instance_word'}: "
            f"method.type = {config.method.type!r} does not use prior "
            f"preservation; use {supported}, or remove the [prior_preservation] section"
        )
