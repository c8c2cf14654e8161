"""Optimizer parameter groups with their own learning rates: the text encoders
(``method.text_encoder_learning_rate``), denoiser blocks (``method.block_lr``) and LoRA+ B matrices
(``method.lora_plus_ratio``). Each group is named, so the banner, the logs and tests can read it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from difftune.config.schema import MethodConfig
from difftune.errors import ConfigError

#: Parameter-name parts of LoRA B matrices (peft's ``lora_B`` and ``lora_embedding_B``).
LORA_B = (".lora_B.", ".lora_embedding_B.")


def parse_block_key(key: str) -> tuple[str, int, int]:
    """``down`` → ``("down", 0, ∞)``, ``up.3`` → ``("up", 3, 3)``, ``0-9`` → ``("", 0, 9)``, ``single.2`` → ``("single", 2, 2)``."""
    kind, _, span = key.rpartition(".") if "." in key else ("", "", key)
    if not span[0].isdigit():
        return span, 0, 10**9
    lo, _, hi = span.partition("-")
    return kind, int(lo), int(hi or lo)


def block_key(block: tuple[str, int | None] | None, keys: Iterable[str]) -> str | None:
    """The most specific ``block_lr`` key covering ``block`` (the narrowest range), or ``None``."""
    if block is None:
        return None
    kind, index = block
    best, width = None, None
    for key in keys:
        k_kind, lo, hi = parse_block_key(key)
        if k_kind == kind and (index is None and hi - lo >= 10**9 - 1 or index is not None and lo <= index <= hi):
            if width is None or hi - lo < width:
                best, width = key, hi - lo
    return best


def lr_groups(named: Iterable[tuple[str, str, nn.Parameter]], lr: float, cfg: MethodConfig,
              family) -> list[dict[str, Any]]:
    """Group ``(role, name, parameter)`` triples by learning rate; each group has a ``name``.

    A ``block_lr`` key that matches no trained denoiser parameter stops the run (it would do nothing).
    """
    groups: dict[str, dict[str, Any]] = {}
    used, seen = set(), set()
    for role, name, p in named:
        if not p.requires_grad:
            continue
        label, rate = role, lr
        if role != "denoiser" and cfg.text_encoder_learning_rate is not None:
            rate = cfg.text_encoder_learning_rate
        if role == "denoiser" and cfg.block_lr:
            block = family.block_of(name)
            if block is not None:
                seen.add(block)
            key = block_key(block, cfg.block_lr)
            if key is not None:
                used.add(key)
                label, rate = f"denoiser {key}", rate * cfg.block_lr[key]
        if cfg.lora_plus_ratio is not None and any(part in f".{name}" for part in LORA_B):
            label, rate = f"{label} lora_B", rate * cfg.lora_plus_ratio
        groups.setdefault(label, {"params": [], "lr": rate, "name": label})["params"].append(p)
    unused = sorted(set(cfg.block_lr) - used)
    if unused:
        names = sorted({f"{k}.{i}" if k and i is not None else (k or str(i)) for k, i in seen},
                       key=lambda s: (s.rstrip("0123456789"), int("0" + "".join(c for c in s if c.isdigit()))))
        raise ConfigError(f"method.block_lr.{unused[0]}: matches no trained parameter of the {family.denoiser_name}; "
                          f"its trained blocks are: {', '.join(names) or 'none'}")
    return list(groups.values())


def named_trainable(modules: dict[str, nn.Module], skip: set[int] | None = None) -> list[tuple[str, str, nn.Parameter]]:
    """``(role, name, parameter)`` for every trainable parameter of ``modules`` (ids in ``skip`` left out)."""
    return [(role, name, p) for role, module in modules.items() for name, p in module.named_parameters()
            if p.requires_grad and id(p) not in (skip or set())]
