"""Config values resolved to what a run uses: the datasets of a run as one list, the validation samples with
their settings, colours as RGB."""

from __future__ import annotations

from dataclasses import dataclass

from difftune.config.schema import DataConfig, ValidationConfig


@dataclass
class ResolvedDataset:
    """One dataset with every inherited setting filled in. ``index`` is its position in the run."""

    index: int
    path: str
    weight: float | None
    repeats: int
    instance_prompt: str | None
    caption_source: str
    trigger: str

    def key(self, data: DataConfig) -> str:
        """The config key of this dataset: ``data`` for ``data.path``, else ``data.datasets[i]``."""
        return "data" if self.index == 0 and data.path else f"data.datasets[{self.index - bool(data.path)}]"


def resolve_datasets(cfg: DataConfig) -> list[ResolvedDataset]:
    """``data.path`` (if set) as the first dataset, then each of ``data.datasets``."""
    out = []
    if cfg.path:
        out.append(ResolvedDataset(0, cfg.path, None, cfg.repeats, cfg.instance_prompt, cfg.caption_source,
                                   cfg.trigger or ""))
    for spec in cfg.datasets:
        out.append(ResolvedDataset(
            len(out), spec.path, spec.weight, spec.repeats,
            spec.instance_prompt if spec.instance_prompt is not None else cfg.instance_prompt,
            spec.caption_source or cfg.caption_source,
            (spec.trigger if spec.trigger is not None else cfg.trigger) or "",
        ))
    return out


def parse_colour(text: str) -> tuple[int, int, int]:
    """An RGB triple from a colour name or ``#rrggbb``; raises ``ValueError`` for anything else."""
    from PIL import ImageColor

    rgb = ImageColor.getrgb(text)
    return tuple(rgb[:3])  # type: ignore[return-value]


def resolutions(data: DataConfig) -> list[int]:
    """``data.resolution`` as a list (one entry unless several are given)."""
    return list(data.resolution) if isinstance(data.resolution, list) else [data.resolution]


def at_resolution(data: DataConfig, resolution: int) -> DataConfig:
    """``data`` with one resolution: what the data stages read for the images at that size."""
    import dataclasses

    return dataclasses.replace(data, resolution=resolution)


@dataclass(frozen=True)
class ValidationSample:
    """One validation prompt with every setting filled in: what ``difftune generate`` would be given."""

    prompt: str
    negative_prompt: str | None
    guidance_scale: float
    seeds: tuple[int, ...]
    width: int
    height: int
    steps: int


def validation_samples(val: ValidationConfig, data: DataConfig) -> list[ValidationSample]:
    """``validation.prompts`` (the shared settings), then ``validation.samples`` (their own, else the shared)."""
    size = val.resolution or resolutions(data)[0]
    default_seeds = tuple(val.seed + i for i in range(val.images_per_prompt))
    out = [ValidationSample(p, val.negative_prompt or None, val.guidance_scale, default_seeds, size, size, val.steps)
           for p in val.prompts]
    for spec in val.samples:
        negative = spec.negative_prompt if spec.negative_prompt is not None else val.negative_prompt
        out.append(ValidationSample(
            spec.prompt, negative or None,
            spec.guidance_scale if spec.guidance_scale is not None else val.guidance_scale,
            tuple(spec.seeds) or default_seeds, spec.width or size, spec.height or size, spec.steps or val.steps))
    return out
