"""What each method accepts in ``[method]``: checked when the config loads, before torch is imported.

Each function raises :class:`~difftune.errors.ConfigError` naming the key; the registry in
:mod:`difftune.methods` says which apply to which method.
"""

from __future__ import annotations

import dataclasses
import re

from difftune.config.schema import MethodConfig, field_default
from difftune.errors import ConfigError

#: Keys every method reads.
COMMON_KEYS = ("type", "ema", "ema_decay", "ema_export", "ema_validate")
LORA_KEYS = ("rank", "alpha", "dropout", "targets", "train_text_encoder", "text_encoder_targets", "init", "variant",
             "rank_pattern", "alpha_pattern", "text_encoder_learning_rate", "lora_plus_ratio", "block_lr")
FULL_KEYS = ("train_text_encoder", "text_encoder_learning_rate", "block_lr", "save_single_file")
TOKEN_KEYS = ("token", "initializer_token", "num_vectors", "templates")
PIVOTAL_KEYS = (*LORA_KEYS, *TOKEN_KEYS, "text_learning_rate", "embedding_stop_step")
#: A block_lr key: ``down``, ``mid``, ``up``, ``down.N``, ``up.N`` (UNets); ``N``, ``N-M``, ``single.N-M`` (transformers).
BLOCK_KEY = re.compile(r"^(?:(?:down|up)(?:\.\d+)?|mid|(?:single\.)?\d+(?:-\d+)?)$")


def check_keys(cfg: MethodConfig, keys: tuple[str, ...], users: dict[str, tuple[str, ...]]) -> None:
    """A ``[method]`` key set away from its default that this method does not read stops the run.

    ``users`` maps each method name to its keys, so the message can say which methods the key is for.
    """
    allowed = set(COMMON_KEYS) | set(keys)
    for f in dataclasses.fields(cfg):
        default = field_default(f)
        if f.name not in allowed and getattr(cfg, f.name) != default:
            for_ = " and ".join(f'"{m}"' for m, k in users.items() if f.name in k)
            raise ConfigError(
                f"method.{f.name}: does not apply to method.type = {cfg.type!r} (it is for {for_}); remove it. "
                f"The [method] keys of {cfg.type!r}: {', '.join(k for k in (*COMMON_KEYS, *keys) if k != 'type')}"
            )
    for key, needs, ok in (
        ("ema_decay", "method.ema = true", cfg.ema), ("ema_export", "method.ema = true", cfg.ema),
        ("ema_validate", "method.ema = true", cfg.ema),
        ("text_encoder_targets", "method.train_text_encoder = true", cfg.train_text_encoder),
        ("text_encoder_learning_rate", "method.train_text_encoder = true", cfg.train_text_encoder),
        ("lora_plus_ratio", 'method.variant = "lora" or "dora" (LoHa and LoKr have no B matrix)',
         cfg.variant in ("lora", "dora")),
    ):
        f = MethodConfig.__dataclass_fields__[key]
        default = field_default(f)
        if not ok and getattr(cfg, key) != default:
            raise ConfigError(f"method.{key}: only applies with {needs}; set that, or remove method.{key}")
    for key in cfg.block_lr:
        if not BLOCK_KEY.match(key):
            raise ConfigError(f"method.block_lr.{key}: not a block; use down, mid, up, down.N, up.N (UNets) or "
                              "N, N-M, single.N-M (transformer blocks)")


def no_rules(cfg: MethodConfig) -> None:
    """A method with no settings of its own to check."""


def check_full(cfg: MethodConfig) -> None:
    """Full fine-tuning has no rules beyond which keys it reads."""


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
