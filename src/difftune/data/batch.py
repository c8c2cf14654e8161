"""What the data stage hands the training step: one image (:class:`Item`) and a micro-batch (:class:`Batch`).

An image arrives either as pixels or, with ``data.cache_latents``, as the VAE's latent distribution
(``latent_mean``, ``latent_std``); its caption either as text only or, with ``data.cache_text``,
also as the prompt's embeddings (``conditioning``, keyed as the family's ``encode_prompt`` returns
them). The size fields are what SDXL's micro-conditioning reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class Item:
    """One image of the dataset, ready to batch."""

    caption: str
    original_size: tuple[int, int] | None
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    index: int
    pixels: torch.Tensor | None = None
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None
    conditioning: dict[str, torch.Tensor] | None = None
    #: Weight of this image's loss (prior preservation gives class images their own).
    loss_weight: float = 1.0
    is_class_image: bool = False


@dataclass
class Batch:
    """A micro-batch: per-image captions and sizes, and the images as pixels or cached latents."""

    captions: list[str] = field(default_factory=list)
    original_sizes: list[tuple[int, int] | None] = field(default_factory=list)
    crop_top_lefts: list[tuple[int, int]] = field(default_factory=list)
    target_sizes: list[tuple[int, int]] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    #: Images in [-1, 1], (batch, 3, H, W); ``None`` when the latents are cached.
    pixels: torch.Tensor | None = None
    #: Cached latent distribution (scaled mean and std); ``None`` when pixels are given.
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None
    #: Cached prompt embeddings; ``None`` when prompts are encoded in the step.
    conditioning: dict[str, torch.Tensor] | None = None
    #: Per-image loss weights, ``None`` when every image counts the same.
    loss_weights: torch.Tensor | None = None
    #: Which images are class images (prior preservation), ``None`` without them.
    is_class_image: torch.Tensor | None = None
    #: One seed per image for its random draws in the step (latent sample, noise, timestep, template),
    #: derived from the run's seed, the step and the image's place in the global batch, so a global batch
    #: draws the same whatever the number of processes it is split over. ``None``: the global torch RNG.
    seeds: list[int] | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def with_captions(self, captions: list[str]) -> Batch:
        """The same batch with other captions (e.g. placeholder tokens written in)."""
        return dataclasses.replace(self, captions=list(captions))


def collate(items: list[Item]) -> Batch:
    """Stack items into a :class:`Batch`; loss weights and class flags only where they say something."""
    first = items[0]
    batch = Batch(
        captions=[it.caption for it in items],
        original_sizes=[it.original_size for it in items],
        crop_top_lefts=[it.crop_top_left for it in items],
        target_sizes=[it.target_size for it in items],
        indices=[it.index for it in items],
    )
    for name in ("pixels", "latent_mean", "latent_std"):
        if getattr(first, name) is not None:
            setattr(batch, name, torch.stack([getattr(it, name) for it in items]))
    if first.conditioning is not None:
        batch.conditioning = {k: torch.stack([it.conditioning[k] for it in items]) for k in first.conditioning}
    if any(it.is_class_image for it in items) or any(it.loss_weight != 1.0 for it in items):
        batch.loss_weights = torch.tensor([it.loss_weight for it in items], dtype=torch.float32)
        batch.is_class_image = torch.tensor([it.is_class_image for it in items])
    return batch
