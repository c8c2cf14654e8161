"""The run's speed and memory report: :class:`RunMonitor` times steps (and the wait for data) without
adding any host-device synchronisation, and reports peak memory at the end of the run."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftune.fileio import atomic_write_text


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory in bytes and what it counts: allocated tensors on CUDA, resident set size elsewhere."""
    from difftune.training.memory import peak

    return peak(device)


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
    #: Peak memory while loading and caching, before the first step (see :mod:`difftune.training.memory`).
    load_peak: int = 0

    def __post_init__(self) -> None:
        from difftune.training.memory import start_training_peak

        self.load_peak = start_training_peak(self.device)

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

    def summary(self, components=None, params=(), optimizer=None) -> dict:
        """Step times and memory; with ``components``, ``params`` and ``optimizer`` the peak's breakdown too."""
        from difftune.training.memory import breakdown

        steady = self.step_times[self.warmup:] or self.step_times
        waits = self.data_waits[self.warmup:] or self.data_waits
        peak, kind = peak_memory(self.device)
        out: dict = {
            "steps": len(self.step_times),
            "first_step_seconds": round(self.step_times[0], 4) if self.step_times else 0.0,
            "median_step_seconds": round(statistics.median(steady), 4) if steady else 0.0,
            "median_data_wait_seconds": round(statistics.median(waits), 4) if waits else 0.0,
            "peak_memory_bytes": peak,
            "peak_memory_kind": kind,
            "load_peak_memory_bytes": self.load_peak,
            "step_seconds": [round(t, 4) for t in self.step_times],
        }
        if components is not None:
            out["peak_memory_breakdown_bytes"] = breakdown(components, list(params), optimizer, peak)
        if self.compiled and self.step_times:
            out["compile_seconds_estimate"] = round(max(0.0, self.step_times[0] - out["median_step_seconds"]), 2)
        return out

    def describe(self, summary: dict | None = None) -> str:
        from difftune.training.memory import describe_breakdown

        s = summary or self.summary()
        compiled = (f"; compiling took about {s['compile_seconds_estimate']:.1f} s"
                    if "compile_seconds_estimate" in s else "")
        parts = s.get("peak_memory_breakdown_bytes")
        held = f": {describe_breakdown(parts)}" if parts else ""
        return (f"median step {s['median_step_seconds']:.3f} s (first step {s['first_step_seconds']:.2f} s, "
                f"waiting for data {s['median_data_wait_seconds'] * 1000:.1f} ms/step); "
                f"load peak {s.get('load_peak_memory_bytes', 0) / 2**30:.2f} GiB, "
                f"training peak {s['peak_memory_bytes'] / 2**30:.2f} GiB ({s['peak_memory_kind']}){held}{compiled}")

    def write(self, folder: Path, summary: dict | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "performance.json"
        atomic_write_text(path, json.dumps(summary or self.summary(), indent=2) + "\n")
        return path

