"""Sample validation images from the in-memory model with the current adapter."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difftune.config.resolve import ValidationSample
from difftune.inference.images import make_grid
from difftune.inference.sampling import sample_image
from difftune.training.precision import autocast


@torch.no_grad()
def sample_images(pipeline, samples: list[ValidationSample], device: torch.device, autocast_dtype: torch.dtype | None,
                  extra: dict | None = None) -> list[tuple[int, str, int, Image.Image]]:
    """One image per (sample, seed), made as ``difftune generate`` makes it (:func:`sample_image`);
    ``extra``: further pipeline arguments the training asks for (``guidance_rescale`` at zero terminal SNR)."""
    pipeline.set_progress_bar_config(disable=True)
    out = []
    with autocast(device, autocast_dtype):
        for index, s in enumerate(samples):
            for seed in s.seeds:
                image = sample_image(pipeline, s.prompt, steps=s.steps, guidance=s.guidance_scale, seed=seed,
                                     negative_prompt=s.negative_prompt, width=s.width, height=s.height, extra=extra)
                out.append((index, s.prompt, seed, image))
    return out


def run_validation(family, components, denoiser, text_encoders, samples: list[ValidationSample],
                   device: torch.device, autocast_dtype, out_dir: Path, step: int, trackers,
                   extra: dict | None = None, write: bool = True) -> list[Path]:
    """Save each image (``NN-seedS.png``, NN the sample's index) and a grid under ``out_dir/step-N`` and log
    them; returns the saved paths. ``write=False``: sample only (the other processes of a sharded run,
    whose every forward the main process's sampling needs), save and log nothing.

    Call it with the modules in eval mode (a run does, inside ``Run.evaluating()``).
    """
    pipeline = family.build_pipeline(components, denoiser, text_encoders)
    try:
        made = sample_images(pipeline, samples, device, autocast_dtype, extra)
    finally:
        del pipeline
        gc.collect()
    if not write:
        return []
    folder = out_dir / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, _prompt, seed, image in made:
        p = folder / f"{index:02d}-seed{seed}.png"
        image.save(p)
        paths.append(p)
    grid = make_grid([m[3] for m in made], cols=max(len(s.seeds) for s in samples))
    grid_path = folder / "grid.png"
    grid.save(grid_path)
    paths.append(grid_path)
    for tracker in trackers:
        log_images(tracker, [m[1:] for m in made], step)
    return paths


def log_images(tracker, samples, step: int) -> None:
    """``samples``: (prompt, seed, image); one tensorboard image batch per size (samples may differ in size)."""
    if tracker.name == "tensorboard":
        sizes = sorted({img.size for _, _, img in samples})
        for size in sizes:
            arrays = np.stack([np.asarray(img) for _, _, img in samples if img.size == size])
            tag = "validation" if len(sizes) == 1 else f"validation/{size[0]}x{size[1]}"
            tracker.writer.add_images(tag, arrays, step, dataformats="NHWC")
    elif tracker.name == "wandb":
        import wandb

        tracker.log({"validation": [wandb.Image(img, caption=f"{p} (seed {s})") for p, s, img in samples]}, step=step)
