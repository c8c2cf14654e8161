"""Weight-only quantisation of frozen model parts (``model.quantize``, ``model.quantize_text_encoders``).

Each mode is served by the first backend in :data:`BACKENDS` that can run it here (peft's habit:
a list of dispatchers, first match wins):

- ``bitsandbytes`` (``int8``, ``nf4``) when a CUDA GPU and the package are present: diffusers'
  and transformers' own loaders quantise shard by shard (``BitsAndBytesConfig``).
- ``torchao`` (``int8``, ``fp8``, ``nf4``) on any device: int8 / float8 weight-only tensors and
  QLoRA's NF4 tensor, swapped into each ``nn.Linear`` as it is loaded (:mod:`difftune.models.streaming`).
- ``optimum-quanto`` (``int4``) on any device: group-wise 4-bit weights.

Only ``nn.Linear`` weights are quantised (convolutions, embeddings and norms keep the load dtype).
The quantised layers stay ``nn.Linear`` modules, so peft's LoRA layers wrap them like any other and
the saved adapter names the same modules as one trained on the unquantised base.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from difftune.errors import DifftuneError

#: Every value of ``model.quantize`` / ``model.quantize_text_encoders``.
MODES = ("none", "int8", "fp8", "int4", "nf4")

#: NF4 as in QLoRA: 64 weights per scale, scales quantised in blocks of 256.
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256
#: Weights per scale of the 4-bit integer mode (quanto's default; smaller widths use a per-row scale).
INT4_GROUP = 128


@dataclass(frozen=True)
class Backend:
    """A library that quantises some modes, and how to reach it."""

    name: str
    package: str  # the importable module, for the "not installed" check
    extra: str  # pip extra that installs it
    modes: tuple[str, ...]
    needs_cuda: bool
    #: Quantise one ``nn.Linear`` in place or return its replacement; ``None`` for the bitsandbytes
    #: backend, whose quantisation happens inside diffusers' / transformers' loaders.
    quantize_linear: Callable[[nn.Linear, str], nn.Module] | None

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version({"optimum.quanto": "optimum-quanto"}.get(self.package, self.package))
        except PackageNotFoundError:
            return "?"


def _torchao_linear(linear: nn.Linear, mode: str) -> nn.Module:
    if mode == "nf4":
        from torchao.quantization import to_nf4

        weight = to_nf4(linear.weight.data, NF4_BLOCK, _nf4_scaler_block(linear.weight.numel()))
        linear.weight = nn.Parameter(weight, requires_grad=False)
        return linear
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    quantize_(linear, Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig())
    linear.weight.requires_grad_(False)
    linear.__class__ = FrozenQuantizedLinear
    return linear


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """``x @ W.T + b`` for a frozen quantised ``W`` that keeps only ``W`` itself for the backward pass.

    torchao's int8 / float8 weight-only linear runs ``mm(x, W.to(x.dtype))`` under autograd, which
    saves that full-precision copy of the weight for the input's gradient — 2 bytes per weight under
    bf16 autocast, 4 without — for every layer until the backward pass reaches it (with gradient
    checkpointing: every layer of the block being recomputed). Here the copy is made, used and freed
    in the forward pass, and made again in the backward pass (QLoRA's NF4 linear does the same).
    With one scale per output row (torchao's default for both modes) the scale is applied to the
    output, as torchao does: ``x @ q.T * s``, the backward ``(g * s) @ q`` — casting ``q`` is several
    times faster on the CPU than torchao's general ``dequantize``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the quantised tensor itself: no copy
        scale = _row_scale(weight)
        if scale is None:
            y = nn.functional.linear(x, weight.dequantize(x.dtype))
        else:
            y = nn.functional.linear(x, weight.qdata.to(x.dtype)) * scale.to(x.dtype)
        return y if bias is None else y + bias.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        scale = _row_scale(weight)
        if scale is None:
            return grad @ weight.dequantize(grad.dtype), None, None
        return (grad * scale.to(grad.dtype)) @ weight.qdata.to(grad.dtype), None, None


def _row_scale(weight: torch.Tensor) -> torch.Tensor | None:
    """The per-output-row scale of a symmetric int8 / float8 weight as a vector, else ``None``."""
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    zero_point = getattr(weight, "zero_point", None)
    if qdata is None or scale is None or qdata.ndim != 2 or scale.numel() != qdata.shape[0]:
        return None
    if zero_point is not None and bool(zero_point.any()):
        return None
    return scale.reshape(-1)


class FrozenQuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a frozen torchao int8 / float8 tensor (see :class:`_FrozenQuantizedMatmul`).

    The input is cast to the autocast dtype when autocast is on (else to the weight's dtype), as a
    plain ``nn.Linear`` under autocast would be; the output has that dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        with torch.autocast(device, enabled=False):
            return _FrozenQuantizedMatmul.apply(x.to(dtype), self.weight, self.bias)


def _nf4_scaler_block(numel: int) -> int:
    # QLoRA's 256 scales per block where the layer has whole blocks of them (every layer of a full-size
    # model); a narrower layer uses the largest power of two that divides its number of scales.
    scales = numel // NF4_BLOCK
    block = NF4_SCALER_BLOCK
    while scales % block:
        block //= 2
    return block


def _cast_input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    # quanto's 4-bit kernels take activations in the weights' dtype only; autocast does not see
    # them (they are a custom autograd function), so an fp32 activation would be refused.
    x = args[0]
    return (x.to(module.weight.dtype), *args[1:]) if x.dtype != module.weight.dtype else args


def _quanto_linear(linear: nn.Linear, mode: str) -> nn.Module:
    from optimum.quanto import qint4
    from optimum.quanto.nn import quantize_module

    qlinear = quantize_module(linear, weights=qint4)
    qlinear.freeze()
    qlinear.weight.requires_grad_(False)
    qlinear.register_forward_pre_hook(_cast_input_to_weight_dtype)
    return qlinear


BACKENDS: tuple[Backend, ...] = (
    Backend("bitsandbytes", "bitsandbytes", "bnb", ("int8", "nf4"), needs_cuda=True, quantize_linear=None),
    Backend("torchao", "torchao", "quantize", ("int8", "fp8", "nf4"), needs_cuda=False, quantize_linear=_torchao_linear),
    Backend("optimum-quanto", "optimum.quanto", "quantize", ("int4",), needs_cuda=False, quantize_linear=_quanto_linear),
)


def backend_for(mode: str, key: str = "model.quantize", cuda: bool | None = None) -> Backend | None:
    """The backend that quantises ``mode`` on this machine (``None`` for ``"none"``).

    Raises a one-line :class:`DifftuneError` naming ``key`` and the extra to install when no backend
    can; checked before any weights are read.
    """
    if mode == "none":
        return None
    if mode not in MODES:
        raise DifftuneError(f"{key}: {mode!r} is not one of {', '.join(MODES)}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    candidates = [b for b in BACKENDS if mode in b.modes and (cuda or not b.needs_cuda)]
    for backend in candidates:
        if backend.installed():
            if backend.name == "bitsandbytes":
                _check_bitsandbytes_version(mode, key)
            return backend
    if not candidates:
        raise DifftuneError(f'{key} = "{mode}": needs a CUDA GPU; set {key} = "none"')
    needed = candidates[-1]
    raise DifftuneError(
        f'{key} = "{mode}": {needed.name} is not installed; run pip install "difftune[{needed.extra}]" '
        f'or set {key} = "none"'
    )


def _check_bitsandbytes_version(mode: str, key: str) -> None:
    import bitsandbytes
    from packaging.version import Version

    if mode == "int8" and Version(bitsandbytes.__version__) < Version("0.48"):
        # Older bitsandbytes cannot move an 8-bit model between devices, which training needs.
        raise DifftuneError(
            f'{key} = "int8" needs bitsandbytes >= 0.48 (found {bitsandbytes.__version__}); upgrade it, '
            "or uninstall it to quantise with torchao"
        )


def bitsandbytes_config(mode: str, compute_dtype: torch.dtype, for_transformers: bool = False):
    """A diffusers (or transformers) ``BitsAndBytesConfig`` for ``mode``."""
    if for_transformers:
        from transformers import BitsAndBytesConfig
    else:
        from diffusers import BitsAndBytesConfig
    if mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def quantizable(module: nn.Module, mode: str) -> bool:
    """True for the ``nn.Linear`` layers ``mode`` can hold (NF4 needs whole blocks of weights)."""
    if type(module) is not nn.Linear:
        return False
    weight = module.weight
    if not weight.is_floating_point() or weight.device.type == "meta":
        return False
    if mode == "nf4":
        return weight.numel() % NF4_BLOCK == 0
    return True


def quantize_linear(module: nn.Linear, mode: str, backend: Backend) -> nn.Module:
    """``module`` with its weight quantised to ``mode`` (the same object, or its replacement)."""
    return backend.quantize_linear(module, mode)


def quantize_in_place(model: nn.Module, mode: str, backend: Backend) -> int:
    """Quantise every eligible ``nn.Linear`` of an already loaded ``model``; return how many.

    Used where streaming cannot be (single-file checkpoints, converted while loading); layers are
    quantised one at a time, so the float copy of each is freed as soon as it is replaced.
    """
    count = 0
    for name, child in list(model.named_modules()):
        if quantizable(child, mode):
            replace_module(model, name, quantize_linear(child, mode, backend))
            count += 1
    return count


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if getattr(parent, attr) is not new:
        setattr(parent, attr, new)


def describe(mode: str, backend: Backend) -> str:
    return f"{mode} ({backend.name} {backend.version()})"
