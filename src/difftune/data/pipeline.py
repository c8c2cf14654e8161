"""The data stage of a run: scan, buckets, caches, dataset and batch order, from one call."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset

from difftune.config.resolve import at_resolution, parse_colour, resolutions
from difftune.config.schema import Config
from difftune.data.batch import Batch, collate
from difftune.data.cache import (
    FillStats,
    default_cache_dir,
    fill_latents,
    fill_text,
    latent_cache_for,
    release_frozen_encoders,
    text_cache_for,
)
from difftune.data.captions import possible_captions
from difftune.data.dataset import ImageCaptionDataset
from difftune.data.holdout import split
from difftune.data.prior import with_class_images
from difftune.data.probe import Problem
from difftune.data.sampling import BatchOrder, batch_order, item_sizes
from difftune.data.sources import ScanResult, load_examples
from difftune.errors import DifftuneError


@dataclass
class TrainingData:
    """What the loop needs from the data: the dataset, the order it is read in, and how items batch."""

    scan: ScanResult
    dataset: Dataset
    order: BatchOrder
    collate: Callable[[list], Batch] = collate
    latent_stats: FillStats | None = None
    text_stats: FillStats | None = None
    held_out: list = dataclasses.field(default_factory=list)

    def card_entry(self) -> str:
        """The model card's dataset line, e.g. ``12 images (2 skipped: 1 corrupt image, 1 too small)``."""
        n = len({id(ex) for ex in self.scan.examples})  # each image once, whatever the resolutions
        skipped = self.scan.skipped_summary()
        return f"{n} images ({skipped})" if skipped != "none skipped" else f"{n} images"


def build_training_data(config: Config, family=None, components=None, *, class_examples=(), rank: int = 0,
                        world: int = 1, barrier=lambda: None, log=print,
                        progress: bool = False, scan: ScanResult | None = None) -> TrainingData:
    """Everything the loop needs from the data; fills the caches when enabled (split between the processes).

    The held-out split (``validation.holdout``) is taken before anything else, so held-out images
    are never trained on nor cached; ``class_examples`` (prior preservation) are paired with the
    training images. ``log`` receives messages (a multi-process run passes a no-op on the others).
    ``scan``: the data's :func:`~difftune.data.sources.load_examples`, if the caller already made it.
    """
    cfg = config.data
    classes = list(class_examples)
    scan = scan or load_examples(cfg, log)
    train_examples, held_out = split(scan.examples, cfg, config.validation, config.train.seed)
    scan, sizes = at_every_resolution(dataclasses.replace(scan, examples=train_examples), cfg)
    buckets = sorted(set(sizes))
    latent_cache = text_cache = None
    latent_stats = text_stats = None
    if cfg.cache_latents or cfg.cache_text:
        folder = default_cache_dir(cfg.cache_dir, config.output.dir)
        if cfg.cache_latents:
            latent_cache = latent_cache_for(folder, components)
            # A class image takes the size of the instance it is paired with: one latent per bucket.
            # Every process fills its share (every world-th image); all read the whole cache after the barrier.
            images = scan.examples + [ex for ex in classes for _ in buckets]
            latent_stats = fill_latents(latent_cache, family, components, images[rank::world],
                                        (sizes + buckets * len(classes))[rank::world], flips=cfg.random_flip,
                                        background=parse_colour(cfg.background), progress=progress)
        if cfg.cache_text:
            text_cache = text_cache_for(folder, components)
            captions = sorted({c for ex in scan.examples + classes
                               for c in possible_captions(ex.caption, ex.trigger, cfg)})
            text_stats = fill_text(text_cache, family, components, captions[rank::world], progress=progress)
        barrier()
        share = f" by process {rank} of {world} (each fills its share)" if world > 1 else ""
        for name, stats in (("latent", latent_stats), ("text", text_stats)):
            if stats is not None:
                log(f"{name} cache {folder}: {stats.hits} reused, {stats.misses} computed{share}")
        if latent_cache is not None:
            _drop_nonfinite(scan, sizes, latent_cache, cfg, log)
            classes = _finite_class_examples(classes, sorted(set(sizes)), latent_cache, cfg, log)  # after drops
    dataset = ImageCaptionDataset(scan.examples, cfg, config.train.seed, sizes, latent_cache, text_cache)
    try:
        order = batch_order(scan, sizes, cfg, config.train.batch_size, config.train.seed, rank, world)
    except ValueError as exc:
        raise DifftuneError(str(exc)) from None
    dataset, collate_fn = with_class_images(config, dataset, classes, latent_cache, text_cache)
    return TrainingData(scan, dataset, order, collate_fn, latent_stats, text_stats, held_out)


def at_every_resolution(scan: ScanResult, cfg) -> tuple[ScanResult, list[tuple[int, int]]]:
    """Every example once per ``data.resolution`` (in that order), with its training size at each.

    The held-out split is taken before, on the images, so it is the same whatever the resolutions."""
    sizes: list[tuple[int, int]] = []
    for resolution in resolutions(cfg):
        sizes += item_sizes(scan.examples, at_resolution(cfg, resolution))
    return dataclasses.replace(scan, examples=scan.examples * len(resolutions(cfg))), sizes


def _nonfinite(cache, ex, sizes, cfg) -> bool:
    """Whether the VAE gave NaN/inf latents for ``ex`` at any of ``sizes`` (and flips)."""
    flips = (False, True) if cfg.random_flip else (False,)
    return any(cache.bad_marker(cache.key_for(ex, size, f)).is_file() for size in sizes for f in flips)


def _report_nonfinite(examples, cfg, log) -> list[Problem]:
    """Name each example with NaN/inf latents; stop the run instead with ``data.on_bad_file = "error"``."""
    problems = [Problem(ex.name, "non-finite latents", "the VAE produced NaN/inf latents "
                        "(try model.dtype = \"fp32\" for the VAE, or check the image)") for ex in examples]
    if problems and cfg.on_bad_file == "error":
        raise DifftuneError("NaN/inf latents, and data.on_bad_file = \"error\":\n" +
                            "\n".join(f"  {p.line}" for p in problems))
    for p in problems:
        log(f"skipping {p.line}")
    return problems


def _finite_class_examples(classes, sizes, cache, cfg, log) -> list:
    """Class images whose latents are finite at every bucket size; the others are reported and skipped."""
    bad = [ex for ex in classes if _nonfinite(cache, ex, sizes, cfg)]
    _report_nonfinite(bad, cfg, log)
    kept = [ex for ex in classes if ex not in bad]
    if classes and not kept:
        raise DifftuneError("no usable class images left: every class image gave NaN/inf latents "
                            "(delete prior_preservation.class_data to generate new ones)")
    return kept


def _drop_nonfinite(scan: ScanResult, sizes, cache, cfg, log) -> None:
    """Examples whose VAE latents are NaN/inf are reported by name and skipped (or stop the run)."""
    bad = [i for i, (ex, size) in enumerate(zip(scan.examples, sizes, strict=True))
           if _nonfinite(cache, ex, [size], cfg)]
    if not bad:
        return
    scan.problems += _report_nonfinite([scan.examples[i] for i in bad], cfg, log)
    dropped = set(bad)
    keep = [i for i in range(len(scan.examples)) if i not in dropped]
    scan.examples[:] = [scan.examples[i] for i in keep]
    sizes[:] = [sizes[i] for i in keep]
    if not scan.examples:
        raise DifftuneError("no usable images left: every image gave NaN/inf latents")


def release_if_cached(config: Config, components) -> bool:
    """With both caches on, free the VAE and text encoders (kept on the CPU if something needs them later).

    Does nothing the second time (the encoders were released already)."""
    cfg = config.data
    if components.encoders_offloaded or components.vae is None:
        return True
    if cfg.cache_latents and cfg.cache_text and not config.method.train_text_encoder:
        # Validation samples and the held-out loss still need them, and so does the `full` method's
        # export (a whole pipeline folder): keep them on the CPU then.
        needed_later = (bool(config.validation.prompts or config.validation.samples)
                        or config.validation.holdout is not None or config.method.type == "full")
        release_frozen_encoders(components, keep_on_cpu=needed_later)
        return True
    return False
