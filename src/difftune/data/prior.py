"""DreamBooth prior preservation: class images, generated once with the base model, paired with instance images.

Every micro-batch holds the instance images followed by as many class images, each captioned with
the prompt it was drawn from (``prior_preservation.class_prompt``, or with ``instance_word`` an instance
caption without that word); ``Batch.loss_weights`` gives instance images weight 1 and
class images ``prior_preservation.loss_weight``. The loss is the mean of weight × loss over the
batch, i.e. (instance loss + weight × prior loss) / 2.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from difftune.config.resolve import resolutions
from difftune.config.schema import Config, PriorPreservationConfig
from difftune.data.batch import Batch, Item, collate
from difftune.data.captions import without_word
from difftune.data.dataset import ImageCaptionDataset
from difftune.data.probe import Problem, probe_image
from difftune.data.sources import IMAGE_SUFFIXES, Example, scan
from difftune.errors import ConfigError, DifftuneError


def class_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


#: The prompt of each generated class image, one JSON line per image (``file_name``, ``text``), written
#: before the image itself: an interrupted run leaves at most a line without its image, never an image
#: drawn from an unknown prompt. Images without a line are the user's own.
PROMPTS_FILE = "metadata.jsonl"


def recorded_prompts(folder: Path) -> dict[str, str]:
    """``file name -> prompt`` of the class images difftune generated into ``folder``."""
    path = folder / PROMPTS_FILE
    if not path.is_file():
        return {}
    prompts = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            prompts[str(entry["file_name"])] = str(entry["text"])
        except (ValueError, KeyError, TypeError):
            raise DifftuneError(f"{path}, line {number}: not a {{\"file_name\", \"text\"}} JSON line ({line[:80]!r}); "
                                "fix or delete that line (or the class folder, to generate the class images "
                                "again)") from None
    return prompts


def prompts_from_captions(config: Config) -> bool:
    """Whether the class prompts come from the instance captions (``instance_word``), so need the data scanned."""
    cfg = config.prior_preservation
    return cfg.enabled and not cfg.class_prompt


def class_prompts(config: Config, log=print, examples: list[Example] | None = None) -> list[str]:
    """The prompts class images are drawn from: ``class_prompt``, or (``instance_word``) every distinct
    instance caption with that word taken out, in the data's order (``examples``: the data's, if scanned
    already)."""
    cfg = config.prior_preservation
    if cfg.class_prompt:
        return [cfg.class_prompt]
    word = cfg.instance_word.strip()
    prompts: list[str] = []
    others = 0
    for ex in scan(config.data).examples if examples is None else examples:
        text = without_word(ex.caption, word)
        if text is None and ex.trigger.strip().lower() == word.lower():  # the trigger is added at training time
            text = ex.caption.strip()
        if text is None:
            others += 1
        elif not text:
            raise ConfigError(f"prior_preservation.instance_word: the caption of {ex.name} is only {word!r}; "
                              "without it nothing is left to draw a class image from. Write what the image "
                              "shows around the word (\"a photo of sks dog\"), or use class_prompt")
        elif text not in prompts:
            prompts.append(text)
    if not prompts:
        raise ConfigError(f"prior_preservation.instance_word: no caption contains {word!r} (nor is it data.trigger); "
                          "give the word that marks the subject in the captions, or use class_prompt")
    if others:
        log(f"prior preservation: {others} image(s) without {word!r} in the caption are not the subject's; "
            "no class prompt is drawn from them")
    return prompts


def class_plan(prompts: list[str], count: int) -> list[str]:
    """The prompt of each of ``count`` class images: the prompts in turn (the first ones once more when
    ``count`` is not a multiple)."""
    return [prompts[i % len(prompts)] for i in range(count)]


def generate_class_images(cfg: PriorPreservationConfig, prompts: list[str], family, components,
                          device: torch.device, resolution: int, seed: int, log=print) -> list[Path]:
    """Generate the missing class images with the base model into ``cfg.class_data``; return the new files.

    ``prompts`` are drawn in turn (:func:`class_plan`); the images the folder already has count for their
    recorded prompt, or for ``class_prompt`` when they have none (the user's own). Call this before the
    method changes the model. Planned image ``i`` uses seed ``seed + i``, so a run that was interrupted
    continues with the same images it would have made.
    """
    folder = Path(cfg.class_data).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    todo = match_folder(folder, cfg, prompts).missing
    if not todo:
        return []
    what = repr(prompts[0]) if len(prompts) == 1 else f"{len(prompts)} prompts from the captions"
    log(f"prior preservation: generating {len(todo)} class images for {what} into {folder}")
    modules = (components.denoiser, components.vae, *components.text_encoders)
    for module in modules:
        module.to(device)
    pipe = family.build_pipeline(components, components.denoiser, list(components.text_encoders))
    pipe.set_progress_bar_config(disable=True)
    written = []
    index = 0
    with torch.no_grad():
        for start in range(0, len(todo), cfg.sample_batch_size):
            chunk = todo[start:start + cfg.sample_batch_size]
            generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i, _ in chunk]
            images = pipe(
                [prompt for _, prompt in chunk], num_inference_steps=cfg.sample_steps,
                guidance_scale=cfg.guidance_scale, height=resolution, width=resolution, generator=generators,
            ).images
            for image, (_, prompt) in zip(images, chunk, strict=True):
                while (folder / f"class-{index:05d}.png").exists():
                    index += 1
                path = folder / f"class-{index:05d}.png"
                with open(folder / PROMPTS_FILE, "a", encoding="utf-8") as f:  # the prompt first (see PROMPTS_FILE)
                    f.write(json.dumps({"file_name": path.name, "text": prompt}) + "\n")
                partial = path.with_name(f".{path.name}.partial.png")
                image.save(partial)
                os.replace(partial, path)
                written.append(path)
    del pipe
    return written


@dataclass
class FolderMatch:
    """The class folder against the plan of prompts (:func:`class_plan`)."""

    #: ``(image, prompt)`` of the images this run uses, in file-name order.
    used: list[tuple[Path, str]]
    #: ``(plan index, prompt)`` of the planned images the folder lacks, in plan order.
    missing: list[tuple[int, str]]
    #: How many images the folder has beyond the plan (drawn for other prompts, or more than needed).
    unused: int


def match_folder(folder: Path, cfg: PriorPreservationConfig, prompts: list[str]) -> FolderMatch:
    """Which of ``folder``'s images stand for which planned class image.

    An image stands for its recorded prompt, else (the user's own images) ``class_prompt``; with
    ``instance_word`` an image of unknown prompt is not used. The first images of a prompt, by file name,
    fill that prompt's places in the plan; the places left over are missing.
    """
    recorded = recorded_prompts(folder)
    plan = class_plan(prompts, cfg.num_class_images)
    wanted = Counter(plan)
    used: list[tuple[Path, str]] = []
    unused = 0
    for path in class_images(folder):
        prompt = recorded.get(path.name, cfg.class_prompt)
        if wanted[prompt] > 0:
            wanted[prompt] -= 1
            used.append((path, prompt))
        else:
            unused += 1
    have = Counter(prompt for _, prompt in used)
    missing = []
    for i, prompt in enumerate(plan):
        if have[prompt] > 0:
            have[prompt] -= 1
        else:
            missing.append((i, prompt))
    return FolderMatch(used, missing, unused)


def class_examples(config: Config, family, components, device: torch.device, *, is_main: bool = True,
                   barrier=lambda: None, log=print, examples: list[Example] | None = None) -> list[Example]:
    """The class examples of this run (``[]`` without prior preservation), generating missing ones first.

    Each is captioned with the prompt it was drawn from. Images in the folder generated for a prompt this
    run does not draw (another class prompt, or captions that changed) are left there and not used.
    Only the main process generates (on ``device``); ``barrier`` makes the others wait for it.
    ``examples``: the training data's, if already scanned (class prompts from the captions).
    """
    cfg = config.prior_preservation
    if not cfg.enabled:
        return []
    prompts = class_prompts(config, log if is_main else (lambda _: None), examples)
    if is_main:
        generate_class_images(cfg, prompts, family, components, device, resolutions(config.data)[0],
                              config.train.seed, log)
    barrier()
    folder = Path(cfg.class_data).expanduser()
    match = match_folder(folder, cfg, prompts)
    chosen, unused = match.used, match.unused
    if not chosen:
        raise DifftuneError(f"prior_preservation.class_data: no images in {cfg.class_data}")
    if unused and is_main:
        log(f"prior preservation: {unused} image(s) in {folder} are not used (drawn for other prompts, or more "
            "than num_class_images)")
    # Probed like training images: the size and byte digest key the latent cache, and a bad file
    # in a folder of the user's own class images is named and skipped.
    examples = []
    for path, prompt in chosen:
        info = probe_image(path, min_size=config.data.min_size, max_pixels=config.data.max_pixels)
        if isinstance(info, Problem):
            log(f"skipping class image {info.line}")
            continue
        examples.append(Example(path, prompt, path.name, info.size, info.digest))
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
