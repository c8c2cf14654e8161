"""Streamed loading: build a model without weights, then read, cast and quantise one tensor at a time.

A quantised model loaded the usual way first exists whole in its load dtype (and, for a file in
another dtype, twice: the file's tensors and the converted copy). Here the model is created on the
``meta`` device, each tensor of the safetensors files is read with plain file reads (not a memory
map, whose touched pages would count in the process until the file is closed), cast, placed, and
each ``nn.Linear`` is quantised as soon as its weight has arrived. Host memory during start-up is
the quantised model plus one unquantised tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.errors import DifftuneError
from difftune.models.quantize import Backend, quantizable, quantize_linear, replace_module
from difftune.tensors import tensor_bytes

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class StreamStats:
    """What a streamed load did: tensors read, layers quantised, the largest tensor held unquantised."""

    files: int = 0
    tensors: int = 0
    quantized_layers: int = 0
    unexpected: int = 0
    largest_tensor_bytes: int = 0


#: Return freed memory to the system after reading this many bytes (see :func:`_trim`).
TRIM_EVERY_BYTES = 16 * 2**20


def _trim() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``).

    Tensors below glibc's adaptive mmap threshold (up to 32 MiB) come from the heap; freeing the
    unquantised copies leaves holes that the smaller quantised tensors do not fill, so without this
    the resident set grows by about the unquantised model after all.
    """
    import contextlib
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def read_safetensors(path: Path):
    """Yield ``(name, tensor)`` for every tensor of a ``.safetensors`` file, reading each into fresh memory."""
    with open(path, "rb") as f:
        try:
            (n,) = torch.frombuffer(bytearray(f.read(8)), dtype=torch.int64).tolist()
            header = json.loads(f.read(n))
        except (ValueError, RuntimeError, UnicodeDecodeError) as exc:
            raise DifftuneError(f"{path}: not a safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        start = 8 + n
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _DTYPES.get(entry["dtype"])
            if dtype is None:
                raise DifftuneError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(memoryview(buf.numpy())) != end - begin:
                raise DifftuneError(f"{path}: truncated file (tensor {name} is cut short)")
            yield name, buf.view(dtype).reshape(entry["shape"])
        # The file has been read once; keep the page cache for other processes' memory.
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def weight_files(folder: Path, variant: str | None = None) -> list[Path] | None:
    """The safetensors files of one component folder (all shards), or ``None`` if it has none."""
    infix = f".{variant}" if variant else ""
    for index in sorted(folder.glob(f"*{infix}.safetensors.index.json")):
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(p for p in folder.glob(f"*{infix}.safetensors")
                   if variant or p.name.count(".") == 1)  # without a variant: not model.fp16.safetensors
    return files or None


def empty_model(cls: type, folder: Path) -> nn.Module:
    """``cls`` built from the config in ``folder`` with its parameters on the meta device."""
    from accelerate import init_empty_weights

    if hasattr(cls, "load_config"):  # diffusers ModelMixin
        config = cls.load_config(folder)
        with init_empty_weights():
            return cls.from_config(config)
    config = cls.config_class.from_pretrained(folder)  # transformers PreTrainedModel
    with init_empty_weights():
        return cls._from_config(config)


def load_streamed(cls: type, folder: Path, dtype: torch.dtype, mode: str, backend: Backend | None,
                  variant: str | None = None, stats: StreamStats | None = None) -> nn.Module:
    """Load ``cls`` from the component ``folder`` tensor by tensor, quantising linear layers to ``mode``.

    Raises :class:`DifftuneError` if the folder has no safetensors weights or they do not fit ``cls``.
    """
    from accelerate.utils import set_module_tensor_to_device

    files = weight_files(folder, variant)
    if files is None:
        raise DifftuneError(f"{folder}: no .safetensors weights to stream (pickle .bin files are not read "
                            "for quantised loading); convert them to safetensors")
    stats = stats if stats is not None else StreamStats()
    model = empty_model(cls, folder)
    names = dict(model.named_parameters(remove_duplicate=False))
    names.update(model.named_buffers(remove_duplicate=False))
    pending = {n: {p for p, _ in m.named_parameters(recurse=False)}
               for n, m in model.named_modules() if type(m) is nn.Linear} if backend is not None else {}
    since_trim = 0
    for path in files:
        stats.files += 1
        for key, tensor in read_safetensors(path):
            if key not in names:
                stats.unexpected += 1
                continue
            stats.tensors += 1
            stats.largest_tensor_bytes = max(stats.largest_tensor_bytes, tensor_bytes(tensor))
            since_trim += tensor_bytes(tensor)
            if since_trim > TRIM_EVERY_BYTES:
                _trim()
                since_trim = 0
            cast = dtype if tensor.is_floating_point() else None
            set_module_tensor_to_device(model, key, "cpu", value=tensor, dtype=cast)
            del tensor
            module_name, _, param = key.rpartition(".")
            waiting = pending.get(module_name)
            if waiting is not None:
                waiting.discard(param)
                if not waiting:
                    del pending[module_name]
                    _quantize(model, module_name, mode, backend, stats)
    _trim()
    if stats.tensors == 0:
        raise DifftuneError(f"{folder}: none of the tensors in {files[0].name} belong to a {cls.__name__}")
    _finish(model, dtype, folder)
    return model


def _quantize(model: nn.Module, name: str, mode: str, backend: Backend, stats: StreamStats) -> None:
    module = model.get_submodule(name)
    if quantizable(module, mode):
        replace_module(model, name, quantize_linear(module, mode, backend))
        stats.quantized_layers += 1


def _finish(model: nn.Module, dtype: torch.dtype, folder: Path) -> None:
    """Tie shared weights, check nothing is left on the meta device, cast float buffers, set eval mode."""
    if any(p.device.type == "meta" for p in model.parameters()) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DifftuneError(f"{folder}: the weights lack {shown}; is this the right model folder?")
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != dtype:
                module._buffers[name] = buf.to(dtype)
    model.eval()


def local_component_folder(source: Any, subfolder: str) -> Path:
    """The local folder of one component of a diffusers folder or Hub id (Hub files are downloaded)."""
    if source.kind == "folder":
        return Path(source.path) / subfolder
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(source.path, revision=source.revision, allow_patterns=[f"{subfolder}/*"])
    except Exception as exc:  # noqa: BLE001 - network and cache errors of several types
        raise DifftuneError(f"{source.path}: could not download {subfolder} ({type(exc).__name__})") from None
    return Path(root) / subfolder
