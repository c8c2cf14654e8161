"""Sample validation images from the in-memory model with the current adapter."""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difftune.config.schema import ValidationConfig
from difftune.inference.images import make_grid


@torch.no_grad()
def sample_images(pipeline, cfg: ValidationConfig, resolution: int, device: torch.device,
                  autocast_dtype: torch.dtype | None, extra: dict | None = None) -> list[tuple[str, int, Image.Image]]:
    """Generate every prompt ``images_per_prompt`` times; image i of a prompt uses seed ``cfg.seed + i``.

    ``extra``: further pipeline arguments the training asks for (``guidance_rescale`` at zero terminal SNR)."""
    pipeline.set_progress_bar_config(disable=True)
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    out = []
    with ctx:
        for prompt in cfg.prompts:
            for i in range(cfg.images_per_prompt):
                generator = torch.Generator(device="cpu").manual_seed(cfg.seed + i)
                image = pipeline(
                    prompt,
                    negative_prompt=cfg.negative_prompt or None,
                    num_inference_steps=cfg.steps,
                    guidance_scale=cfg.guidance_scale,
                    height=resolution,
                    width=resolution,
                    generator=generator,
                    **(extra or {}),
                ).images[0]
                out.append((prompt, cfg.seed + i, image))
    return out


def run_validation(family, components, denoiser, text_encoders, cfg: ValidationConfig, resolution: int,
                   device: torch.device, autocast_dtype, out_dir: Path, step: int, trackers,
                   extra: dict | None = None) -> list[Path]:
    """Save each image and a grid under ``out_dir/step-N`` and log them; returns the saved paths.

    Call it with the modules in eval mode (a run does, inside ``Run.evaluating()``).
    """
    pipeline = family.build_pipeline(components, denoiser, text_encoders)
    try:
        samples = sample_images(pipeline, cfg, resolution, device, autocast_dtype, extra)
    finally:
        del pipeline
        gc.collect()
    folder = out_dir / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, (_prompt, seed, image) in enumerate(samples):
        p = folder / f"{n // cfg.images_per_prompt:02d}-seed{seed}.png"
        image.save(p)
        paths.append(p)
    grid = make_grid([s[2] for s in samples], cols=cfg.images_per_prompt)
    grid_path = folder / "grid.png"
    grid.save(grid_path)
    paths.append(grid_path)
    for tracker in trackers:
        log_images(tracker, samples, step)
    return paths


def log_images(tracker, samples, step: int) -> None:
    if tracker.name == "tensorboard":
        arrays = np.stack([np.asarray(img) for _, _, img in samples])
        tracker.writer.add_images("validation", arrays, step, dataformats="NHWC")
    elif tracker.name == "wandb":
        import wandb

        tracker.log({"validation": [wandb.Image(img, caption=f"{p} (seed {s})") for p, s, img in samples]}, step=step)
