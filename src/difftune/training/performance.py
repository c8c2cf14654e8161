"""Speed settings of a training run, applied in one place, and the run's speed and memory report.

``train.channels_last`` and ``train.compile`` are applied by :func:`apply`, which also lets LoRA
layers under autocast skip peft's input casts; :class:`RunMonitor` times steps (and the wait for data) without adding any host-device
synchronisation, and reports peak memory at the end of the run.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftune.fileio import atomic_write_text
from difftune.training.precision import autocast_dtype

#: Why ``train.compile`` is refused without CUDA. Measured with torch 2.13 / diffusers 0.42 / peft 0.21:
#: the "inductor" backend's backward through a LoRA UNet on CPU returned wrong LoRA gradients (some
#: blocks zero) while the "eager" and "aot_eager" backends matched eager exactly, and the compiled
#: step was no faster.
COMPILE_ON_CPU_PROBLEM = (
    "torch.compile on CPU gave wrong LoRA gradients in difftune's checks (and no speed-up); "
    "it is only allowed with a CUDA GPU"
)

def apply(config, components, train_view, log=print):
    """Apply the speed settings; return the view the training step uses.

    Compiling wraps only the training view's denoiser, so validation, held-out evaluation and
    export keep using the eager module (their no-grad calls would otherwise trigger recompiles).
    """
    t = config.train
    if autocast_dtype(config) is not None:
        skip_lora_input_casts(train_view)
    if t.channels_last:
        # Only the denoiser: latents from a channels-last VAE would make ``randn_like`` lay the same
        # random numbers out differently, so a seed would no longer give the same noise.
        components.denoiser.to(memory_format=torch.channels_last)
    if t.compile:
        import dataclasses

        compiled = torch.compile(train_view.denoiser, mode=None if t.compile_mode == "default" else t.compile_mode)
        train_view = dataclasses.replace(train_view, denoiser=compiled)
        log(f"torch.compile ({t.compile_mode}): the first steps compile the denoiser; the compile time is "
            "reported at the end of the run")
    return train_view


def skip_lora_input_casts(train_view) -> int:
    """Let plain LoRA layers pass their bf16/fp16 input straight to autocast; return how many.

    peft casts a LoRA layer's input to the LoRA weights' dtype (fp32) before ``lora_A``, and
    autocast casts it straight back to bf16 for the matmul: two copies of the activation, and two
    more in the backward, for every LoRA layer in every step. Under autocast the product is the
    same bf16 matmul either way, so the result is bit-for-bit the same (``tests/training/test_performance_options.py``).
    Variant layers (DoRA, LoHa, LoKr) keep peft's behaviour.
    """
    changed = 0
    roots = [m for m in (train_view.denoiser, *train_view.text_encoders) if m is not None]
    for module in (m for root in roots for m in root.modules()):
        variants = getattr(module, "lora_variant", None)
        if hasattr(module, "lora_A") and isinstance(variants, dict) and not variants:
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory in bytes and what it counts: allocated tensors on CUDA, resident set size elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024, "process RSS"


@dataclass
class RunMonitor:
    """Wall-clock times of optimizer steps and of the waits for data, measured on the host.

    Nothing here synchronises with the device: on a GPU a step's time is when the host finished
    queueing it, which in steady state matches the device's pace.
    """

    device: torch.device
    warmup: int = 2
    compiled: bool = False
    step_times: list[float] = field(default_factory=list)
    data_waits: list[float] = field(default_factory=list)
    _last: float = field(default_factory=time.perf_counter)
    _waited: float = 0.0

    def timed(self, batches):
        """Wrap a batch iterator so the time spent waiting for each batch is counted."""
        while True:
            started = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self._waited += time.perf_counter() - started
            yield batch

    def step_done(self) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self._last)
        self.data_waits.append(self._waited)
        self._last, self._waited = now, 0.0

    def restart_clock(self) -> None:
        """Exclude time spent outside training steps (validation, checkpoints) from the next step."""
        self._last = time.perf_counter()

    def summary(self) -> dict[str, float | int | str]:
        steady = self.step_times[self.warmup:] or self.step_times
        waits = self.data_waits[self.warmup:] or self.data_waits
        peak, kind = peak_memory(self.device)
        out: dict[str, float | int | str] = {
            "steps": len(self.step_times),
            "first_step_seconds": round(self.step_times[0], 4) if self.step_times else 0.0,
            "median_step_seconds": round(statistics.median(steady), 4) if steady else 0.0,
            "median_data_wait_seconds": round(statistics.median(waits), 4) if waits else 0.0,
            "peak_memory_bytes": peak,
            "peak_memory_kind": kind,
            "step_seconds": [round(t, 4) for t in self.step_times],
        }
        if self.compiled and self.step_times:
            out["compile_seconds_estimate"] = round(max(0.0, self.step_times[0] - out["median_step_seconds"]), 2)
        return out

    def describe(self, summary: dict | None = None) -> str:
        s = summary or self.summary()
        compiled = (f"; compiling took about {s['compile_seconds_estimate']:.1f} s"
                    if "compile_seconds_estimate" in s else "")
        return (f"median step {s['median_step_seconds']:.3f} s (first step {s['first_step_seconds']:.2f} s, "
                f"waiting for data {s['median_data_wait_seconds'] * 1000:.1f} ms/step); "
                f"peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB ({s['peak_memory_kind']}){compiled}")

    def write(self, folder: Path, summary: dict | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "performance.json"
        atomic_write_text(path, json.dumps(summary or self.summary(), indent=2) + "\n")
        return path

