"""What each method accepts in ``[method]``: checked when the config loads, before torch is imported.

Each function raises :class:`~difftune.errors.ConfigError` naming the key; the registry in
:mod:`difftune.methods` says which apply to which method.
"""

from __future__ import annotations

import re

from difftune.config.schema import MethodConfig
from difftune.errors import ConfigError


def no_rules(cfg: MethodConfig) -> None:
    """A method with no settings of its own to check."""


def check_lora(cfg: MethodConfig) -> None:
    """Per-module ranks and alphas in range; no text-encoder training for variants no loader reads there."""
    for key, pattern in (("method.rank_pattern", cfg.rank_pattern), ("method.alpha_pattern", cfg.alpha_pattern)):
        for module, value in pattern.items():
            if value < (1 if key == "method.rank_pattern" else 0):
                raise ConfigError(f"{key}.{module}: {value!r} is out of range")
    if cfg.variant in ("loha", "lokr") and cfg.train_text_encoder:
        raise ConfigError(
            f"method.train_text_encoder: not supported with method.variant = {cfg.variant!r} (no common loader "
            "reads text-encoder LoHa/LoKr weights); use variant \"lora\" or \"dora\", or train the denoiser only"
        )


def check_tokens(cfg: MethodConfig) -> None:
    """Methods that learn placeholder tokens need the tokens and the words that start them."""
    if not cfg.token:
        raise ConfigError(f"method.token: required for method.type = {cfg.type!r}, e.g. token = \"<sks>\"")
    if not cfg.initializer_token:
        raise ConfigError(f"method.initializer_token: required for {cfg.type!r}, a word such as \"dog\" or \"painting\"")
    if len(cfg.initializer_token) not in (1, len(cfg.token)):
        raise ConfigError(
            f"method.initializer_token: give one word for all tokens or one per token ({len(cfg.token)}), "
            f"got {len(cfg.initializer_token)}"
        )
    if len(set(cfg.token)) != len(cfg.token) or any(not t.strip() or " " in t for t in cfg.token):
        raise ConfigError(f"method.token: {cfg.token!r} must be distinct tokens without spaces")
    # ComfyUI and A1111 name an embedding by its file name, made of the token's letters, digits, _ and -.
    stems = [re.sub(r"[^0-9A-Za-z_-]+", "", t) for t in cfg.token]
    if not all(stems) or len(set(stems)) != len(stems):
        raise ConfigError(f"method.token: {cfg.token!r} must each hold a letter or digit, and differ in them "
                          "(the ComfyUI/A1111 embedding file is named after them, e.g. <sks> -> sks.safetensors)")


def check_pivotal(cfg: MethodConfig) -> None:
    """Pivotal tuning is LoRA and textual inversion together: both sets of rules."""
    check_lora(cfg)
    check_tokens(cfg)
