"""``difftune demo``: a complete run on a tiny model, with no download and no GPU."""

from __future__ import annotations

import os
import time
from pathlib import Path

DEMO_PROMPTS = ["a red circle", "a blue square"]


def default_workdir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "difftune" / "demo"


def run_demo(steps: int = 300, workdir: str | Path | None = None) -> Path:
    """Build the tiny model and dataset (once), train a LoRA, print where the results are."""
    from difftune.run_config import load_config
    from difftune.tiny import build_tiny_sd, make_tiny_dataset
    from difftune.training.loop import train

    work = Path(workdir) if workdir else default_workdir()
    model = work / "tiny-sd"
    if not (model / "model_index.json").is_file():
        print(f"building a tiny Stable Diffusion model (random weights) in {model}")
        build_tiny_sd(model)
    data = work / "shapes"
    if not (data / "metadata.jsonl").is_file():
        make_tiny_dataset(data, n=8, size=64)
    out = work / "run"
    config = load_config(data={
        "model": {"path": str(model)},
        "method": {"type": "lora", "rank": 8},
        "data": {"path": str(data), "resolution": 64, "random_flip": False},
        "train": {"max_steps": steps, "learning_rate": 1e-3, "batch_size": 2, "lr_scheduler": "cosine",
                  "warmup_steps": 10, "mixed_precision": "bf16", "checkpoint_every": max(1, steps // 2),
                  "checkpoints_keep": 1, "log_every": 10},
        "validation": {"prompts": DEMO_PROMPTS, "every": max(1, steps // 2), "steps": 10, "guidance_scale": 3.0},
        "output": {"dir": str(out), "existing": "overwrite"},  # the demo's own folder: each demo replaces the last
    })
    started = time.perf_counter()
    result = train(config)
    first, last = result.losses[0][1], result.losses[-1][1]
    print()
    print(f"demo finished in {time.perf_counter() - started:.0f} s: loss {first:.4f} -> {last:.4f}")
    print(f"  adapter:     {out / 'pytorch_lora_weights.safetensors'}")
    print(f"  model card:  {out / 'README.md'}")
    print(f"  samples:     {out / 'samples'}")
    print(f"  tensorboard: tensorboard --logdir {out / 'logs'}")
    return out
