"""The training dataset and a deterministic, resumable batch order."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from difftune.config.schema import DataConfig
from difftune.data.sources import Example
from difftune.data.transforms import prepare_image


class ImageCaptionDataset(Dataset):
    """Items are addressed by ``(epoch, index)`` so augmentation is a pure function of the seed."""

    def __init__(self, examples: list[Example], cfg: DataConfig, seed: int) -> None:
        self.examples = examples
        self.cfg = cfg
        self.seed = seed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        ex = self.examples[index]
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        size = (self.cfg.resolution, self.cfg.resolution)
        prepared = prepare_image(ex.image, size, center_crop=self.cfg.center_crop, flip=self.cfg.random_flip, rng=rng)
        return {
            "pixels": prepared.pixels,
            "caption": ex.caption,
            "original_size": prepared.original_size,
            "crop_top_left": prepared.crop_top_left,
            "target_size": size,
            "index": index,
        }


def collate(items: list[dict]) -> dict:
    return {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "captions": [it["caption"] for it in items],
        "original_sizes": [it["original_size"] for it in items],
        "crop_top_lefts": [it["crop_top_left"] for it in items],
        "target_sizes": [it["target_size"] for it in items],
        "indices": [it["index"] for it in items],
    }


class ResumableBatches:
    """An endless, deterministic sequence of micro-batches for one process.

    Micro-batch ``m`` belongs to epoch ``m // batches_per_epoch``; each epoch shuffles the data
    with a generator seeded by ``(seed, epoch)`` and deals consecutive batches to processes in
    turn. Starting at any ``m`` reproduces exactly what an uninterrupted run would see.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 start: int = 0) -> None:
        self.batches_per_epoch = num_items // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {num_items} images, fewer than train.batch_size ({batch_size}) × "
                f"{world} process(es); lower the batch size or add images"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world, self.start = rank, world, start

    def order(self, epoch: int) -> list[int]:
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
