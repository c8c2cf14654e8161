"""Held-out loss: the training objective on images the model never trains on.

Each held-out image is noised at ``validation.loss_timesteps`` fixed timesteps with fixed noise
(drawn from a generator seeded by the image's position), captions and latents are made under a
fixed seed, and the models run in eval mode; so the number moves only when the weights do, and
is comparable across steps and across runs with the same data and seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from difftune.config.resolve import resolutions
from difftune.config.schema import DataConfig, ValidationConfig
from difftune.data.batch import collate
from difftune.data.dataset import ImageCaptionDataset
from difftune.data.sources import Example
from difftune.fileio import atomic_write_text
from difftune.seeds import derived_seed
from difftune.training.loss import batch_conditioning, batch_latents, diffusion_losses
from difftune.training.precision import autocast

BEST_FILE = "best.json"


class HeldOutLoss:
    """Evaluates the held-out loss and keeps the early-stopping and best-checkpoint bookkeeping."""

    def __init__(self, examples: list[Example], data: DataConfig, validation: ValidationConfig, seed: int,
                 batch_size: int) -> None:
        # Each held-out image at every training resolution (square, centre-cropped), the same images every time.
        sizes = [(r, r) for r in resolutions(data) for _ in examples]
        self.dataset = ImageCaptionDataset(examples * len(resolutions(data)),
                                           dataclasses.replace(data, center_crop=True, random_flip=False), seed, sizes)
        #: Batches never mix sizes: the indices of each resolution's block, in batches.
        self.batches = [list(range(start, min(start + batch_size, end)))
                        for end in range(len(examples), len(sizes) + 1, max(len(examples), 1))
                        for start in range(end - len(examples), end, batch_size)]
        self.cfg = validation
        self.seed = seed
        self.batch_size = batch_size
        self.history: list[tuple[int, float]] = []
        self.best: tuple[int, float] | None = None
        self.evals_without_improvement = 0
        self.best_checkpoint: dict | None = None

    def due(self, step: int, total: int) -> bool:
        every = self.cfg.loss_every
        return (every and step % every == 0) or step == total

    @torch.no_grad()
    def evaluate(self, family, components, objective, method, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> float:
        """Mean held-out loss with fixed timesteps, noise, captions and VAE samples.

        Call it with the modules in eval mode (a run does, inside ``Run.evaluating()``).
        """
        timesteps = objective.holdout_timesteps(self.cfg.loss_timesteps)
        total, count = 0.0, 0
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), autocast(device, autocast_dtype):
            for indices in self.batches:
                start = indices[0]
                torch.manual_seed(derived_seed(self.seed, "holdout", start))
                batch = method.prepare_batch(collate([self.dataset[(0, i)] for i in indices]))
                latents = batch_latents(family, components, batch, device).float()
                conditioning = batch_conditioning(family, components, batch, device, trains_text=False)
                for k, t in enumerate(timesteps):
                    noise = torch.stack([
                        torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(
                            derived_seed(self.seed, "holdout-noise", i, k)))
                        for i in indices
                    ]).to(device)
                    t_batch = torch.full((len(indices),), t, device=device, dtype=timesteps.dtype)
                    losses = diffusion_losses(family, components, objective, latents, conditioning, batch,
                                              timesteps=t_batch, noise=noise)
                    total += float(losses.sum())
                    count += len(indices)
        return total / max(count, 1)

    def record(self, step: int, loss: float) -> bool:
        """Note an evaluation; True if it is the best so far."""
        self.history.append((step, loss))
        if math.isfinite(loss) and (self.best is None or loss < self.best[1]):
            self.best = (step, loss)
            self.evals_without_improvement = 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.cfg.patience) and self.evals_without_improvement >= self.cfg.patience

    def checkpoint_facts(self, step: int) -> dict | None:
        """Held-out facts for a checkpoint's info.json (``None`` if no evaluation happened at ``step``)."""
        if not self.history or self.history[-1][0] != step:
            return None
        loss = self.history[-1][1]
        is_best = self.best_checkpoint is None or loss < self.best_checkpoint["val_loss"]
        return {"val_loss": loss, "best": is_best}

    def mark_checkpoint(self, checkpoints: Path, folder: Path, step: int, facts: dict | None) -> None:
        """Point ``checkpoints/best.json`` at ``folder`` if it holds the lowest held-out loss so far."""
        if not facts or not facts["best"]:
            return
        self.best_checkpoint = {"checkpoint": folder.name, "step": step, "val_loss": facts["val_loss"]}
        atomic_write_text(checkpoints / BEST_FILE, json.dumps(self.best_checkpoint, indent=2))

    def best_folder(self, checkpoints: Path) -> Path | None:
        return checkpoints / self.best_checkpoint["checkpoint"] if self.best_checkpoint else None


def read_best(checkpoints: Path) -> dict | None:
    """The ``best.json`` record of a run's checkpoints folder, if any."""
    path = checkpoints / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None
