"""The training dataset and a deterministic, resumable batch order."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from difftune.config.resolve import parse_colour
from difftune.config.schema import DataConfig
from difftune.data.captions import final_caption
from difftune.data.sources import Example
from difftune.data.transforms import WHITE, crop_box, prepare_image


class ImageCaptionDataset(Dataset):
    """Items are addressed by ``(epoch, index)`` so augmentation is a pure function of the seed.

    ``sizes`` gives each item's training size (its aspect-ratio bucket); by default the square
    ``data.resolution``. With a latent cache an item carries ``latent_mean``/``latent_std``
    instead of ``pixels``; with a text cache it carries ``conditioning``.
    """

    def __init__(self, examples: list[Example], cfg: DataConfig, seed: int,
                 sizes: list[tuple[int, int]] | None = None, latent_cache=None, text_cache=None) -> None:
        self.examples = examples
        self.cfg = cfg
        self.seed = seed
        self.sizes = sizes or [(cfg.resolution, cfg.resolution)] * len(examples)
        self.latent_cache, self.text_cache = latent_cache, text_cache
        self.background = parse_colour(cfg.background) if cfg.background else WHITE

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return self.item(key)

    def item(self, key: tuple[int, int], size: tuple[int, int] | None = None) -> dict:
        """Item ``key``; ``size`` overrides its target size (class images follow their instance's bucket)."""
        epoch, index = key
        ex = self.examples[index]
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        size = size or self.sizes[index]
        if self.latent_cache is not None:
            flipped = self.cfg.random_flip and rng.random() < 0.5
            mean, std = self.latent_cache.load(self.latent_cache.key_for(ex, size, flipped))
            _, crop = crop_box(ex.size, size, center_crop=True, rng=rng)
            item = {"latent_mean": mean, "latent_std": std, "original_size": ex.size, "crop_top_left": crop}
        else:
            prepared = prepare_image(ex.image, size, center_crop=self.cfg.center_crop, flip=self.cfg.random_flip,
                                     rng=rng, background=self.background)
            item = {"pixels": prepared.pixels, "original_size": prepared.original_size,
                    "crop_top_left": prepared.crop_top_left}
        caption_rng = random.Random(f"{self.seed}/{epoch}/{index}/caption")
        caption = final_caption(ex.caption, ex.trigger, self.cfg, caption_rng)
        item.update(caption=caption, target_size=size, index=index)
        if self.text_cache is not None:
            item["conditioning"] = self.text_cache.load(self.text_cache.key_for(caption))
        return item


def collate(items: list[dict]) -> dict:
    batch = {
        "captions": [it["caption"] for it in items],
        "original_sizes": [it["original_size"] for it in items],
        "crop_top_lefts": [it["crop_top_left"] for it in items],
        "target_sizes": [it["target_size"] for it in items],
        "indices": [it["index"] for it in items],
    }
    for name in ("pixels", "latent_mean", "latent_std"):
        if name in items[0]:
            batch[name] = torch.stack([it[name] for it in items])
    if "conditioning" in items[0]:
        batch["conditioning"] = {k: torch.stack([it["conditioning"][k] for it in items])
                                 for k in items[0]["conditioning"]}
    return batch


class ResumableBatches:
    """An endless, deterministic sequence of micro-batches for one process.

    Micro-batch ``m`` belongs to epoch ``m // batches_per_epoch``; each epoch shuffles the data
    with a generator seeded by ``(seed, epoch)`` and deals consecutive batches to processes in
    turn. Starting at any ``m`` reproduces exactly what an uninterrupted run would see.
    ``plan`` (an :class:`~difftune.data.sampling.EpochPlan`) adds repeats and dataset weights.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 start: int = 0, plan=None) -> None:
        epoch_items = plan.size if plan is not None else num_items
        self.batches_per_epoch = epoch_items // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {epoch_items} images, fewer than train.batch_size ({batch_size}) × "
                f"{world} process(es); lower the batch size or add images"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world, self.start, self.plan = rank, world, start, plan

    def order(self, epoch: int) -> list[int]:
        if self.plan is not None:
            return self.plan.order(epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        m = self.start
        cached_epoch, order = -1, []
        while True:
            epoch, b = divmod(m, self.batches_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, self.order(epoch)
            first = (b * self.world + self.rank) * self.batch_size
            yield [(epoch, i) for i in order[first : first + self.batch_size]]
            m += 1
