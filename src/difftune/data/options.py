"""Data options checked before any weights load, and the datasets of a run resolved to one list."""

from __future__ import annotations

from dataclasses import dataclass

from difftune.config.schema import Config, DataConfig
from difftune.errors import ConfigError


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


def validate_data_options(config: Config) -> None:
    """Cross-field checks of ``[data]`` (called by the config loader)."""
    from difftune.data.transforms import parse_colour

    data = config.data
    try:
        parse_colour(data.background)
    except ValueError:
        raise ConfigError(f"data.background: {data.background!r} is not a colour; use a name such as "
                          "\"white\" or \"#808080\"") from None
    if data.buckets and data.bucket_step > data.resolution:
        raise ConfigError(f"data.bucket_step: {data.bucket_step} is larger than data.resolution "
                          f"({data.resolution}); use a step of at most the resolution, e.g. 64")
    if data.cache_text and config.method.train_text_encoder:
        raise ConfigError("data.cache_text: the text encoder is trained (method.train_text_encoder), so its "
                          "embeddings change every step and cannot be cached; turn one of them off")
    if data.cache_text and data.shuffle_tags:
        raise ConfigError("data.cache_text: data.shuffle_tags makes a new caption every epoch, which cannot be "
                          "cached; turn one of them off")
    for spec in resolve_datasets(data):
        if spec.caption_source == "instance_prompt" and not spec.instance_prompt:
            key = "data" if spec.index == 0 and data.path else f"data.datasets[{spec.index - bool(data.path)}]"
            raise ConfigError(f'{key}.instance_prompt: required when caption_source = "instance_prompt"')
