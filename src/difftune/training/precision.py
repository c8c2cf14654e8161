"""Precision of a run in one place: ``train.mixed_precision = "auto"`` resolved for this machine, the
autocast dtype and the dtype of the frozen weights."""

from __future__ import annotations

import contextlib

import torch

from difftune.compat import cpu_has_native_bf16
from difftune.config.schema import Config, ModelConfig
from difftune.errors import DifftuneError

#: ``auto`` on a CPU with native bf16 picks bf16 only for a denoiser with at least this much work per
#: image: its parameters times its latent positions ((resolution / 8)²). Below it, casting every activation
#: and weight to bf16 costs more than the faster products save. Measured with LoRA forward + backward, batch 4,
#: one thread, AMD EPYC with AVX-512 BF16 (bf16 time / fp32 time): the embedded 4.6 M base at 64 px 1.4 (at
#: 128 px 1.46, at 256 px 0.84), an 18 M UNet at 64 / 128 / 256 px 1.57 / 1.11 / 0.72, a 73 M UNet at
#: 128 px 0.67, a 220 M UNet at 128 and 256 px 0.73 and 0.72 (docs/performance.md, "Precision").
BF16_MIN_CPU_WORK = 5e9


def resolve_mixed_precision(value: str, model_dtype: str = "auto", cuda: bool | None = None,
                            cpu_work: float | None = None) -> str:
    """The concrete autocast setting (``no``, ``fp16`` or ``bf16``) for ``train.mixed_precision``.

    ``cpu_work`` is the denoiser's parameters times its latent positions (:func:`denoiser_work`); on a CPU
    ``auto`` keeps fp32 below :data:`BF16_MIN_CPU_WORK`. ``None`` (not known) counts as a large model."""
    if value != "auto":
        return value
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if model_dtype == "fp16":  # fp16 weights cannot run under bf16 autocast
        return "fp16" if cuda else "no"
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if not cpu_has_native_bf16():
        return "no"
    small = cpu_work is not None and cpu_work < BF16_MIN_CPU_WORK
    return "no" if small and model_dtype == "auto" else "bf16"


def denoiser_work(model: ModelConfig, resolution: int | list[int]) -> float | None:
    """Parameters of ``model``'s denoiser times its latent positions at the largest ``resolution``, or
    ``None`` when the parameter count cannot be read from local files (a Hub id is not fetched for it)."""
    from pathlib import Path

    from difftune.bases import resolve as resolve_builtin
    from difftune.models import resolve_family

    try:
        if not Path(resolve_builtin(model.path)).exists():
            return None
        family, source = resolve_family(model)
    except DifftuneError:
        return None  # loading reports it
    params = family.denoiser_parameters(source)
    size = max(resolution) if isinstance(resolution, list) else resolution
    return None if params is None else params * (size / family.latent_downscale) ** 2


def emulated_bf16_warning(config: Config, device: torch.device) -> str | None:
    """A warning when ``train.mixed_precision = "bf16"`` is asked for on a CPU that has no native bf16:
    there torch emulates every bf16 product, tens of times slower than fp32 (a 512×512 matrix product:
    4 ms in fp32, 200 ms in bf16 on a 2-core AVX2 CPU). The run keeps what was asked; ``auto`` picks fp32."""
    if config.train.mixed_precision != "bf16" or device.type != "cpu" or cpu_has_native_bf16():
        return None
    return ('warning: train.mixed_precision = "bf16" on a CPU without native bf16 (no avx512_bf16 or amx_bf16 '
            "flag in /proc/cpuinfo): torch emulates bf16 here, and a step can take 10-50 times as long as in "
            'fp32. Set train.mixed_precision = "auto" (picks fp32 on this CPU, bf16 where it is native) or "no".')


def resolve_for_model(value: str, model: ModelConfig, resolution: int | list[int]) -> str:
    """``value`` (``train.mixed_precision``) resolved for this machine and ``model`` at ``resolution``: the
    denoiser's size is read only where it can change the answer (``auto`` on a CPU with native bf16)."""
    weighs_size = value == "auto" and not torch.cuda.is_available() and cpu_has_native_bf16()
    work = denoiser_work(model, resolution) if weighs_size else None
    return resolve_mixed_precision(value, model.dtype, cpu_work=work)


def mixed_precision(config: Config) -> str:
    """``train.mixed_precision`` with ``auto`` resolved for this machine and model: ``no``, ``fp16`` or ``bf16``."""
    return resolve_for_model(config.train.mixed_precision, config.model, config.data.resolution)


def precision_label(config: Config) -> str:
    """The resolved precision for logs and the model card, with why where ``auto`` chose it: ``bf16
    (auto)``, or ``no (auto: fp32 is faster than bf16 for a denoiser this small on the CPU)``."""
    resolved = mixed_precision(config)
    if config.train.mixed_precision != "auto":
        return resolved
    # the only way auto says fp32 where it would say bf16 for a model of unknown size is the size rule
    small = resolved == "no" and resolve_mixed_precision("auto", config.model.dtype) == "bf16"
    return f"{resolved} (auto: fp32 is faster than bf16 for a denoiser this small on the CPU)" if small else \
        f"{resolved} (auto)"


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
