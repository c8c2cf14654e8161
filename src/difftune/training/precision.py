"""Precision of a run in one place: ``train.mixed_precision = "auto"`` resolved for this machine, the
autocast dtype and the dtype of the frozen weights."""

from __future__ import annotations

import contextlib

import torch

from difftune.compat import cpu_has_native_bf16
from difftune.config.schema import Config


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


def emulated_bf16_warning(config: Config, device: torch.device) -> str | None:
    """A warning when ``train.mixed_precision = "bf16"`` is asked for on a CPU that has no native bf16:
    there torch emulates every bf16 product, tens of times slower than fp32 (a 512×512 matrix product:
    4 ms in fp32, 200 ms in bf16 on a 2-core AVX2 CPU). The run keeps what was asked; ``auto`` picks fp32."""
    if config.train.mixed_precision != "bf16" or device.type != "cpu" or cpu_has_native_bf16():
        return None
    return ('warning: train.mixed_precision = "bf16" on a CPU without native bf16 (no avx512_bf16 or amx_bf16 '
            "flag in /proc/cpuinfo): torch emulates bf16 here, and a step can take 10-50 times as long as in "
            'fp32. Set train.mixed_precision = "auto" (picks fp32 on this CPU, bf16 where it is native) or "no".')


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
