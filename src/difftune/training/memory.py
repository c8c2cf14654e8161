"""Where a run's memory goes: the start-up peak, the training peak, and what the training peak holds.

On the CPU the figures are the process's resident set (``VmHWM`` from ``/proc/self/status``; the
high-water mark is reset after loading through ``/proc/self/clear_refs`` so the training peak is
measured on its own); on a GPU they are CUDA's allocated bytes. The training peak is broken down
into the frozen weights, the trainable state (parameters and gradients), the optimizer state, and
the rest: activations, plus on the CPU the runtime itself (Python, torch, data).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from difftune.tensors import module_bytes, tensor_bytes

PEAK_KIND = {"cuda": "CUDA allocated"}
HOST_KIND = "process RSS"


def host_peak_bytes() -> int:
    """The process's peak resident set size so far (since the last :func:`reset_host_peak`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def host_rss_bytes() -> int:
    """The process's resident set size now."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return host_peak_bytes()


def reset_host_peak() -> bool:
    """Restart the peak RSS from the current RSS (Linux ``clear_refs``); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak(device: torch.device) -> tuple[int, str]:
    """Peak memory in bytes and what it counts."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), PEAK_KIND["cuda"]
    return host_peak_bytes(), HOST_KIND


def start_training_peak(device: torch.device) -> int:
    """Record the start-up (load) peak and restart peak tracking for the training steps; return the former.

    Where the host peak cannot be reset the training peak includes the load peak (reported as such).
    """
    load_peak, _ = peak(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif not reset_host_peak():
        return load_peak
    return load_peak


def breakdown(components, params: list[torch.Tensor], optimizer, peak_bytes: int) -> dict[str, int]:
    """The training peak split into weights, trainable state, optimizer state and the rest (activations)."""
    trainable_ids = {id(p) for p in params}
    modules = [m for m in (components.denoiser, components.vae, *components.text_encoders) if m is not None]
    total_params = sum(module_bytes(m) for m in modules)
    trainable = sum(tensor_bytes(p) for p in params)
    grads = sum(tensor_bytes(p.grad) for p in params if p.grad is not None)
    # zero_grad(set_to_none) frees gradients after each step, but the backward held them: count them.
    grads = grads or trainable
    state = getattr(optimizer, "optimizer", optimizer).state
    opt = sum(tensor_bytes(v) for s in state.values() for v in s.values() if isinstance(v, torch.Tensor))
    weights = max(0, total_params - sum(tensor_bytes(p) for m in modules for p in m.parameters()
                                        if id(p) in trainable_ids))
    parts = {"weights": weights, "trainable": trainable + grads, "optimizer": opt}
    parts["activations_and_other"] = max(0, peak_bytes - sum(parts.values()))
    return parts


def describe_breakdown(parts: dict[str, int]) -> str:
    gib = {k: v / 2**30 for k, v in parts.items()}
    return (f"weights {gib['weights']:.2f} GiB, trainable {gib['trainable']:.2f} GiB (with gradients), "
            f"optimizer {gib['optimizer']:.2f} GiB, activations and other {gib['activations_and_other']:.2f} GiB")
