"""Precision of a run in one place: ``train.mixed_precision = "auto"`` resolved for this machine, the
autocast dtype and the dtype of the frozen weights."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

from difftune.config.schema import Config

#: CPU flags of native bf16 arithmetic (AVX-512 BF16 dot products, AMX tiles).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs whose flags include AVX-512 BF16 or AMX-BF16 (read from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(flag in flags for flag in BF16_CPU_FLAGS)
    return False


def resolve_mixed_precision(value: str, model_dtype: str = "auto", cuda: bool | None = None) -> str:
    """The concrete autocast setting (``no``, ``fp16`` or ``bf16``) for ``train.mixed_precision``."""
    if value != "auto":
        return value
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if model_dtype == "fp16":  # fp16 weights cannot run under bf16 autocast
        return "fp16" if cuda else "no"
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


def mixed_precision(config: Config) -> str:
    """``train.mixed_precision`` with ``auto`` resolved for this machine: ``no``, ``fp16`` or ``bf16``."""
    return resolve_mixed_precision(config.train.mixed_precision, config.model.dtype)


def autocast_dtype(config: Config) -> torch.dtype | None:
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision(config)]


def weight_dtype(config: Config) -> torch.dtype:
    """Frozen weights follow mixed precision unless ``model.dtype`` says otherwise."""
    explicit = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if config.model.dtype != "auto":
        return explicit[config.model.dtype]
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision(config)]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing when ``dtype`` is ``None``."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
