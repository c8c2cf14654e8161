"""The training dataset: items addressed by ``(epoch, index)``, so augmentation is a pure function of the seed."""

from __future__ import annotations

import random

from torch.utils.data import Dataset

from difftune.config.resolve import parse_colour, resolutions
from difftune.config.schema import DataConfig
from difftune.data.batch import Item
from difftune.data.captions import final_caption
from difftune.data.sources import Example
from difftune.data.transforms import WHITE, crop_box, prepare_image


class ImageCaptionDataset(Dataset):
    """Items are addressed by ``(epoch, index)`` so augmentation is a pure function of the seed.

    ``sizes`` gives each item's training size (its aspect-ratio bucket); by default the square
    ``data.resolution``. With a latent cache an item carries ``latent_mean``/``latent_std``
    instead of ``pixels``; with a text cache it carries ``conditioning`` (see :class:`Item`).
    """

    def __init__(self, examples: list[Example], cfg: DataConfig, seed: int,
                 sizes: list[tuple[int, int]] | None = None, latent_cache=None, text_cache=None) -> None:
        self.examples = examples
        self.cfg = cfg
        self.seed = seed
        size = resolutions(cfg)[0]
        self.sizes = sizes or [(size, size)] * len(examples)
        self.latent_cache, self.text_cache = latent_cache, text_cache
        self.background = parse_colour(cfg.background) if cfg.background else WHITE

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        return self.item(key)

    def item(self, key: tuple[int, int], size: tuple[int, int] | None = None) -> Item:
        """Item ``key``; ``size`` overrides its target size (class images follow their instance's bucket)."""
        epoch, index = key
        ex = self.examples[index]
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        size = size or self.sizes[index]
        caption = final_caption(ex.caption, ex.trigger, self.cfg, random.Random(f"{self.seed}/{epoch}/{index}/caption"))
        item = Item(caption, ex.size, (0, 0), size, index)
        if self.latent_cache is not None:
            flipped = self.cfg.random_flip and rng.random() < 0.5
            item.latent_mean, item.latent_std = self.latent_cache.load(self.latent_cache.key_for(ex, size, flipped))
            _, item.crop_top_left = crop_box(ex.size, size, center_crop=True, rng=rng)
        else:
            prepared = prepare_image(ex.image, size, center_crop=self.cfg.center_crop, flip=self.cfg.random_flip,
                                     rng=rng, background=self.background)
            item.pixels, item.original_size, item.crop_top_left = (prepared.pixels, prepared.original_size,
                                                                   prepared.crop_top_left)
        if self.text_cache is not None:
            item.conditioning = self.text_cache.load(self.text_cache.key_for(caption))
        return item
