"""Which items each epoch visits (repeats, dataset weights), and batch orders that resume exactly.

Both batch orders follow :class:`BatchOrder`, the contract with the training loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from difftune.config.schema import DataConfig
from difftune.data.buckets import make_buckets, nearest_bucket
from difftune.seeds import derived_seed


class BatchOrder(Protocol):
    """A deterministic, endless order of micro-batches for one process, resumable at any micro-batch."""

    #: Micro-batches this process sees per epoch (its first epoch, for orders whose epochs differ).
    batches_per_epoch: int
    #: The micro-batch index iteration begins at (set when resuming).
    start: int

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Lists of dataset keys ``(epoch, index)``, one list per micro-batch, from ``start`` on."""
        ...

    def position(self, micro_batch: int) -> tuple[int, int]:
        """(epoch, micro-batch within the epoch) of this process's ``micro_batch``-th micro-batch."""
        ...


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder, ties to the first)."""
    raw = [total * w / sum(weights) for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


class EpochPlan:
    """The items of each epoch in a shuffled order seeded by ``(seed, epoch)``.

    Without weights, each dataset contributes every item ``repeats`` times. With weights, the
    epoch keeps the same length (sum of items × repeats) and each dataset fills its share by
    cycling through its own shuffled items. One dataset, one repeat: a plain permutation.
    """

    def __init__(self, groups: list[list[int]], repeats: list[int], weights: list[float | None], seed: int) -> None:
        self.groups, self.repeats, self.seed = groups, repeats, seed
        self.size = sum(len(g) * r for g, r in zip(groups, repeats, strict=True))
        self.weights = None
        if any(w is not None for w in weights):
            self.weights = [1.0 if w is None else w for w in weights]
            self.counts = _apportion(self.size, [w if g else 0.0 for w, g in zip(self.weights, groups, strict=True)])

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.weights is None:
            pool = [i for grp, r in zip(self.groups, self.repeats, strict=True) for _ in range(r) for i in grp]
        else:
            pool = []
            for d, (grp, count) in enumerate(zip(self.groups, self.counts, strict=True)):
                dg = _generator(self.seed, epoch, "dataset", d)
                taken: list[int] = []
                while len(taken) < count:
                    taken += [grp[i] for i in torch.randperm(len(grp), generator=dg).tolist()]
                pool += taken[:count]
        return [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]


class ResumableBatches:
    """An endless, deterministic sequence of micro-batches for one process.

    Micro-batch ``m`` belongs to epoch ``m // batches_per_epoch``; each epoch shuffles the data
    with a generator seeded by ``(seed, epoch)`` and deals consecutive batches to processes in
    turn. Starting at any ``m`` reproduces exactly what an uninterrupted run would see.
    ``plan`` (an :class:`EpochPlan`) adds repeats and dataset weights.
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

    def position(self, micro_batch: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of this process's ``micro_batch``-th micro-batch."""
        return divmod(micro_batch, self.batches_per_epoch)

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


class BucketBatches:
    """Like :class:`ResumableBatches`, but every batch holds one bucket.

    Each epoch takes the plan's order, groups it by bucket (keeping that order), fills a bucket's
    last global batch (``batch_size`` × processes) by wrapping round to its first items (so no image
    is dropped), and shuffles the global batches with a generator seeded by ``(seed, epoch)``. Each
    process takes its contiguous share of each global batch, so the global batches are the same
    whatever the number of processes. Epochs may differ in length when dataset weights are used, so
    ``start`` is located by counting through the epochs; the result is exactly what an uninterrupted
    run would see.
    """

    def __init__(self, item_buckets: list[tuple[int, int]], plan: EpochPlan, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.item_buckets, self.plan = item_buckets, plan
        self.batch_size, self.seed, self.rank, self.world, self.start = batch_size, seed, rank, world, start
        self.batches_per_epoch = len(self.epoch_batches(0))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {plan.size} images, fewer batches than the {world} process(es) need; "
                "lower train.batch_size or add images"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (``batch_size`` × processes images, one bucket each)."""
        size = self.batch_size * self.world
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in self.plan.order(epoch):
            by_bucket.setdefault(self.item_buckets[i], []).append(i)
        batches = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            k = 0
            while len(items) % size:
                items.append(items[k])
                k += 1
            batches += [items[j: j + size] for j in range(0, len(items), size)]
        perm = torch.randperm(len(batches), generator=_generator(self.seed, epoch, "buckets")).tolist()
        return [batches[p] for p in perm]

    def position(self, micro_batch: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of this process's ``micro_batch``-th micro-batch."""
        epoch, skip = 0, micro_batch
        while skip >= (count := len(self.epoch_batches(epoch))):
            skip -= count
            epoch += 1
        return epoch, skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip = self.position(self.start)
        share = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        while True:
            for batch in self.epoch_batches(epoch)[skip:]:
                yield [(epoch, i) for i in batch[share]]
            epoch, skip = epoch + 1, 0


def item_sizes(examples, cfg: DataConfig) -> list[tuple[int, int]]:
    """The training size (height, width) of each example: its bucket, or the square resolution (``cfg`` has one
    resolution: :func:`~difftune.config.resolve.at_resolution`)."""
    if not cfg.buckets:
        return [(cfg.resolution, cfg.resolution)] * len(examples)
    buckets = make_buckets(cfg.resolution, cfg.bucket_step)
    return [nearest_bucket(ex.size or (cfg.resolution, cfg.resolution), buckets) for ex in examples]


def batch_order(scan, sizes: list[tuple[int, int]], cfg: DataConfig, batch_size: int, seed: int,
                rank: int = 0, world: int = 1) -> BatchOrder:
    """The batch order for a run: bucketed when ``data.buckets`` is on, plain otherwise."""
    datasets = scan.datasets
    plan = EpochPlan(scan.groups(), [d.repeats for d in datasets], [d.weight for d in datasets], seed)
    if cfg.buckets or len(set(sizes)) > 1:  # several resolutions: a batch holds one size, as with buckets
        return BucketBatches(sizes, plan, batch_size, seed, rank, world)
    return ResumableBatches(len(scan.examples), batch_size, seed, rank, world, plan=plan)
