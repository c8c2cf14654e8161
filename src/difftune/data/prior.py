"""DreamBooth prior preservation: class images, generated once with the base model, paired with instance images.

Every micro-batch holds the instance images followed by as many class images, captioned with
``prior_preservation.class_prompt``; ``Batch.loss_weights`` gives instance images weight 1 and
class images ``prior_preservation.loss_weight``. The loss is the mean of weight × loss over the
batch, i.e. (instance loss + weight × prior loss) / 2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from difftune.config.resolve import resolutions
from difftune.config.schema import Config, PriorPreservationConfig
from difftune.data.batch import Batch, Item, collate
from difftune.data.dataset import ImageCaptionDataset
from difftune.data.probe import Problem, probe_image
from difftune.data.sources import IMAGE_SUFFIXES, Example
from difftune.errors import DifftuneError


def class_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def generate_class_images(cfg: PriorPreservationConfig, family, components, device: torch.device,
                          resolution: int, seed: int, log=print) -> list[Path]:
    """Generate the missing class images with the base model into ``cfg.class_data``; return the new files.

    Call this before the method changes the model. Image ``i`` uses seed ``seed + i``, so a run that
    was interrupted continues with the same images it would have made.
    """
    folder = Path(cfg.class_data).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    have = len(class_images(folder))
    missing = cfg.num_class_images - have
    if missing <= 0:
        return []
    log(f"prior preservation: generating {missing} class images for {cfg.class_prompt!r} into {folder}")
    modules = (components.denoiser, components.vae, *components.text_encoders)
    for module in modules:
        module.to(device)
    pipe = family.build_pipeline(components, components.denoiser, list(components.text_encoders))
    pipe.set_progress_bar_config(disable=True)
    written = []
    index = 0
    with torch.no_grad():
        todo = list(range(have, cfg.num_class_images))
        for start in range(0, len(todo), cfg.sample_batch_size):
            chunk = todo[start:start + cfg.sample_batch_size]
            generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in chunk]
            images = pipe(
                [cfg.class_prompt] * len(chunk), num_inference_steps=cfg.sample_steps,
                guidance_scale=cfg.guidance_scale, height=resolution, width=resolution, generator=generators,
            ).images
            for image in images:
                while (folder / f"class-{index:05d}.png").exists():
                    index += 1
                path = folder / f"class-{index:05d}.png"
                image.save(path)
                written.append(path)
    del pipe
    return written


def class_examples(config: Config, family, components, device: torch.device, *, is_main: bool = True,
                   barrier=lambda: None, log=print) -> list[Example]:
    """The class examples of this run (``[]`` without prior preservation), generating missing ones first.

    Only the main process generates (on ``device``); ``barrier`` makes the others wait for it.
    """
    cfg = config.prior_preservation
    if not cfg.class_prompt:
        return []
    if is_main:
        generate_class_images(cfg, family, components, device, resolutions(config.data)[0], config.train.seed, log)
    barrier()
    paths = class_images(Path(cfg.class_data).expanduser())[: cfg.num_class_images]
    if not paths:
        raise DifftuneError(f"prior_preservation.class_data: no images in {cfg.class_data}")
    # Probed like training images: the size and byte digest key the latent cache, and a bad file
    # in a folder of the user's own class images is named and skipped.
    examples = []
    for path in paths:
        info = probe_image(path, min_size=config.data.min_size, max_pixels=config.data.max_pixels)
        if isinstance(info, Problem):
            log(f"skipping class image {info.line}")
            continue
        examples.append(Example(path, cfg.class_prompt, path.name, info.size, info.digest))
    if not examples:
        raise DifftuneError(f"prior_preservation.class_data: no usable images in {cfg.class_data} (see above)")
    return examples


class PriorPreservationDataset(Dataset):
    """Item ``(epoch, i)`` is instance image ``i`` with a class image chosen by ``(epoch, i)``."""

    def __init__(self, instances: ImageCaptionDataset, classes: ImageCaptionDataset, loss_weight: float) -> None:
        self.instances, self.classes, self.loss_weight = instances, classes, loss_weight

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Item, Item]:
        epoch, index = key
        class_index = (epoch * len(self.instances) + index) % len(self.classes)
        instance = self.instances[key]
        # The class image takes its instance's size, so a batch stays one bucket.
        cls = self.classes.item((epoch, class_index), size=instance.target_size)
        cls.loss_weight, cls.is_class_image = self.loss_weight, True
        return instance, cls


def collate_with_class_images(pairs: list[tuple[Item, Item]]) -> Batch:
    """Instance images first, then their class images; ``loss_weights`` and ``is_class_image`` per image."""
    return collate([p[0] for p in pairs] + [p[1] for p in pairs])


def with_class_images(config: Config, dataset: ImageCaptionDataset, classes: list[Example], latent_cache=None,
                      text_cache=None):
    """The training dataset and its collate function: instance images, paired with class images if any.

    With the caches on, class images are read from them like the instance images (filled by
    ``build_training_data`` at every bucket size), so a batch is all latents or all pixels.
    """
    if not classes:
        return dataset, collate
    class_set = ImageCaptionDataset(classes, config.data, config.train.seed + 1, latent_cache=latent_cache,
                                    text_cache=text_cache)
    paired = PriorPreservationDataset(dataset, class_set, config.prior_preservation.loss_weight)
    return paired, collate_with_class_images
