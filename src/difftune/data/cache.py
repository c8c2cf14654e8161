"""On-disk caches of VAE latents and prompt embeddings, keyed by everything that changes them.

A latent entry is keyed by the image bytes' hash, the target size, the crop, the flip, the
VAE's identity (config + weights fingerprint) and its dtype; a text entry by the caption and the
text encoders' identity. Changing any part of a key recomputes only the entries it touches.
Entries are safetensors files written atomically, so an interrupted fill leaves no half entry.

The latent cache stores the *distribution* (scaled mean and std), not a sample: each step
draws ``mean + std * noise`` with the step's seeded generator, as encoding on the fly would.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftune.data.transforms import crop_box
from difftune.fileio import atomic_write_text, save_safetensors


def module_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a module's class, config and every weight's bytes."""
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps({k: v for k, v in items.items() if not str(k).startswith("_")},
                            sort_keys=True, default=str).encode())
    from difftune.tensors import plain_tensors

    for name, tensor in sorted(module.state_dict().items()):
        for part, plain in plain_tensors(tensor.detach()):  # a quantised weight: its packed data and scales
            t = plain.to("cpu")
            h.update(f"{name}{part}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.reshape(-1).clone(memory_format=torch.contiguous_format)  # quantised scales may be strided
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hash(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


class _Store:
    def __init__(self, folder: Path, identity: str) -> None:
        self.folder, self.identity = Path(folder), identity

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def bad_marker(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.nonfinite"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def _load(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path(key)))


class LatentCache(_Store):
    """Latent distributions, one file per (image, size, crop, flip)."""

    def key_for(self, example, size: tuple[int, int], flipped: bool) -> str:
        _, crop = crop_box(example.size, size, center_crop=True, rng=random.Random(0))
        return _hash("latent", example.digest, size, crop, flipped, self.identity)

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._load(key)
        return t["mean"], t["std"]

    def save(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        save_safetensors({"mean": mean.float(), "std": std.float()}, self.path(key))


class TextCache(_Store):
    """Prompt conditioning (every tensor ``encode_prompt`` returns), one file per caption."""

    def key_for(self, caption: str) -> str:
        return _hash("text", caption, self.identity)

    def load(self, key: str) -> dict[str, torch.Tensor]:
        return self._load(key)

    def save(self, key: str, conditioning: dict[str, torch.Tensor]) -> None:
        save_safetensors({k: v.float() for k, v in conditioning.items()}, self.path(key))


def default_cache_dir(cache_dir: str | None, output_dir: str) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(output_dir).expanduser().absolute().parent / ".difftune-cache"


def latent_cache_for(folder: Path, components) -> LatentCache:
    vae = components.vae
    dtype = next(vae.parameters()).dtype
    return LatentCache(folder / "latents", _hash(module_fingerprint(vae), dtype))


def text_cache_for(folder: Path, components) -> TextCache:
    parts = []
    for encoder, tokenizer in zip(components.text_encoders, components.tokenizers, strict=True):
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        parts += [module_fingerprint(encoder), next(encoder.parameters()).dtype, type(tokenizer).__name__,
                  getattr(tokenizer, "model_max_length", None), _hash(sorted(vocab.items()))]
    return TextCache(folder / "text", _hash(*parts))


@dataclass
class FillStats:
    hits: int = 0
    misses: int = 0
    nonfinite: list[str] = field(default_factory=list)  # example names with NaN/inf latents


#: Images encoded per VAE call when filling the latent cache (same size and flip in one batch).
FILL_BATCH = 16


@torch.no_grad()
def fill_latents(cache: LatentCache, family, components, examples, sizes, *, flips: bool, background,
                 progress: bool = False, batch_size: int = FILL_BATCH) -> FillStats:
    """Encode every (example, flip) not cached yet, ``batch_size`` images of one size per VAE call.

    Non-finite latents get a marker, not an entry (per image, so one bad image spoils no other).
    """
    from tqdm.auto import tqdm

    from difftune.data.transforms import prepare_image

    stats = FillStats()
    jobs = [(ex, size, f) for ex, size in zip(examples, sizes, strict=True) for f in ((False, True) if flips else (False,))]
    pending: dict[tuple, list] = {}  # (size, flip) -> [(key, example)] waiting for a full batch

    def encode(group: list, size, flipped: bool) -> None:
        pixels = torch.stack([prepare_image(ex.image, size, center_crop=True, rng=random.Random(0),
                                            background=background, force_flip=flipped).pixels for _, ex in group])
        mean, std = family.latent_distribution(components, pixels)
        for (key, ex), m, s in zip(group, mean, std, strict=True):
            if not (torch.isfinite(m).all() and torch.isfinite(s).all()):
                atomic_write_text(cache.bad_marker(key), f"{ex.name}: the VAE produced NaN/inf latents\n")
                stats.nonfinite.append(ex.name)
                continue
            cache.save(key, m, s)

    bar = tqdm(total=len(jobs), desc="cache latents", unit="img", disable=not progress, dynamic_ncols=True)
    for ex, size, flipped in jobs:
        key = cache.key_for(ex, size, flipped)
        if cache.bad_marker(key).is_file():
            stats.nonfinite.append(ex.name)
        elif cache.has(key):
            stats.hits += 1
        elif any(k == key for k, _ in pending.get((size, flipped), ())):
            stats.hits += 1  # the same image listed twice: encoded once
        else:
            stats.misses += 1
            group = pending.setdefault((size, flipped), [])
            group.append((key, ex))
            if len(group) == batch_size:
                encode(pending.pop((size, flipped)), size, flipped)
                bar.update(batch_size)
            continue
        bar.update(1)
    for (size, flipped), group in pending.items():
        encode(group, size, flipped)
        bar.update(len(group))
    bar.close()
    return stats


@torch.no_grad()
def fill_text(cache: TextCache, family, components, captions: list[str], *, progress: bool = False) -> FillStats:
    from tqdm.auto import tqdm

    stats = FillStats()
    for caption in tqdm(captions, desc="cache text", unit="prompt", disable=not progress, dynamic_ncols=True):
        key = cache.key_for(caption)
        if cache.has(key):
            stats.hits += 1
            continue
        stats.misses += 1
        conditioning = family.encode_prompt(components, [caption])
        cache.save(key, {k: v[0] for k, v in conditioning.items()})
    return stats


def release_frozen_encoders(components, keep_on_cpu: bool) -> None:
    """Free the VAE and text encoders once every latent and embedding is cached.

    With validation prompts they are needed for sampling, so they move to the CPU (and back for
    each validation, see :func:`frozen_encoders_on`); otherwise they are dropped altogether.
    """
    modules = [components.vae, *components.text_encoders]
    if keep_on_cpu:
        for m in modules:
            m.to("cpu")
        components.encoders_offloaded = True
    else:
        components.vae = None
        components.text_encoders = [None] * len(components.text_encoders)
    del modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def frozen_encoders_on(components, device):
    """Bring offloaded encoders to ``device`` for a validation, and send them back after."""
    if not components.encoders_offloaded:
        yield
        return
    modules = [components.vae, *components.text_encoders]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")
