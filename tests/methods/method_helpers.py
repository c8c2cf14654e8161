"""Image helpers shared by the method tests."""

from __future__ import annotations

import numpy as np
import torch


def pipeline_image(pipe, prompt: str = "a red circle") -> np.ndarray:
    """A small, seeded image from ``pipe`` as a float array."""
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    return np.asarray(image, dtype=np.float32)


def base_pipeline(model_path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_path, safety_checker=None, requires_safety_checker=False)
