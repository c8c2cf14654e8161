"""One image from a pipeline: the call ``difftune generate`` and a run's validation previews share, so a
preview is what ``difftune generate`` makes with the same settings."""

from __future__ import annotations

import json
from pathlib import Path

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


#: The header key of an adapter file saying how its model must be sampled (``Objective.sampling``).
SAMPLING_KEY = "difftune.sampling"


def trained_sampling(paths: list[str | Path]) -> dict:
    """What the adapters' headers ask of the sampler: ``scheduler`` config overrides and pipeline arguments
    (``guidance_rescale``), e.g. for a model trained at zero terminal SNR; ``{}`` if nothing. ``paths`` are
    adapter files or folders (their adapter file; folders without one single file say nothing)."""
    from safetensors import safe_open

    from difftune.adapters.safe_load import resolve_weight_file
    from difftune.errors import DifftuneError

    out: dict = {}
    for path in paths:
        try:
            file = resolve_weight_file(path)
        except DifftuneError:
            continue
        if file.suffix != ".safetensors":
            continue
        with safe_open(str(file), framework="pt") as f:
            text = (f.metadata() or {}).get(SAMPLING_KEY)
        if text:
            out.update(json.loads(text))
    return out


def apply_sampling(pipe, sampling: dict) -> dict:
    """Set the pipeline's scheduler as ``sampling`` says; return the further pipeline arguments."""
    if sampling.get("scheduler"):
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **sampling["scheduler"])
    return {k: v for k, v in sampling.items() if k != "scheduler"}


def sample_image(pipe, prompt: str, **settings):
    """One PIL image of ``prompt``; ``settings`` as :func:`pipeline_kwargs`."""
    return pipe(prompt, **pipeline_kwargs(**settings)).images[0]
