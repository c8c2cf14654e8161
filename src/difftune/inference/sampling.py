"""One image from a pipeline: the call ``difftune generate`` and a run's validation previews share, so a
preview is what ``difftune generate`` makes with the same settings."""

from __future__ import annotations

import torch


def pipeline_kwargs(*, steps: int, guidance: float, seed: int, negative_prompt: str | None = None,
                    width: int | None = None, height: int | None = None, extra: dict | None = None) -> dict:
    """The pipeline arguments for one image (a CPU generator seeded with ``seed``, as diffusers' examples)."""
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance,
              "generator": torch.Generator("cpu").manual_seed(seed)}
    if negative_prompt:
        kwargs["negative_prompt"] = negative_prompt
    if width:
        kwargs["width"] = width
    if height:
        kwargs["height"] = height
    kwargs.update(extra or {})
    return kwargs


def sample_image(pipe, prompt: str, **settings):
    """One PIL image of ``prompt``; ``settings`` as :func:`pipeline_kwargs`."""
    return pipe(prompt, **pipeline_kwargs(**settings)).images[0]
