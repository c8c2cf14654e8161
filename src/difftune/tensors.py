"""What a tensor holds: the plain tensors inside a quantised one, and how many bytes a tensor or module takes.

A leaf (torch only): the data caches hash quantised weights through :func:`plain_tensors`, the
memory report counts bytes through :func:`module_bytes`, the quantisation code tests weights with
:func:`is_quantized`.
"""

from __future__ import annotations

import torch
from torch import nn


def is_quantized(tensor: torch.Tensor) -> bool:
    """True for a quantised weight (a tensor subclass holding packed data)."""
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    return type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__")


def plain_tensors(tensor: torch.Tensor, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """``tensor`` as plain tensors: itself, or for a quantised tensor its inner data and scales, named."""
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        inner = [(n, getattr(data, n)) for n in names]  # a DTensor (FSDP) also names its device mesh
        return [item for n, t in inner if isinstance(t, torch.Tensor) for item in plain_tensors(t, f"{prefix}.{n}")]
    return [(prefix, data)]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies, including the packed data and scales of a quantised tensor."""
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        inner = [getattr(data, n) for n in names]  # a DTensor (FSDP) also names its device mesh
        return sum(tensor_bytes(t) for t in inner if isinstance(t, torch.Tensor))
    if data.device.type == "meta":
        return 0
    return data.numel() * data.element_size()


def module_bytes(module: nn.Module | None) -> int:
    """Bytes of ``module``'s parameters and buffers (each shared tensor counted once)."""
    if module is None:
        return 0
    seen: set[int] = set()
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total
