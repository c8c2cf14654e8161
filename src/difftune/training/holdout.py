"""Held-out loss: the training objective on images the model never trains on.

Each held-out image is noised at ``validation.loss_timesteps`` fixed timesteps with fixed noise
(drawn from a generator seeded by the image's position), captions and latents are made under a
fixed seed, and the models run in eval mode; so the number moves only when the weights do, and
is comparable across steps and across runs with the same data and seed.

With ``validation.holdout_word`` each image is also scored with that word taken out of its caption
(same timesteps, same noise): the *word gain* is how much lower the loss is with the word than
without, on the lower half of the timesteps. It says how much the word has come to mean what the
held-out images show (a diffusion model's own recognition of the concept), and it picks the best
checkpoint and drives early stopping instead of the loss. A subject's held-out loss is a poor guide:
it rises as the subject is learnt (the model commits to the subject's look at the high-noise
timesteps, where an unseen image's layout cannot be predicted; docs/quality.md, "When to stop").
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from difftune.config.resolve import resolutions
from difftune.config.schema import DataConfig, ValidationConfig
from difftune.data.batch import collate
from difftune.data.dataset import ImageCaptionDataset
from difftune.data.prior import without_word
from difftune.data.sources import Example
from difftune.errors import ConfigError
from difftune.fileio import atomic_write_text
from difftune.seeds import derived_seed
from difftune.training.loss import batch_conditioning, batch_latents, diffusion_losses
from difftune.training.precision import autocast

BEST_FILE = "best.json"


@dataclass(frozen=True)
class Evaluation:
    """One held-out evaluation."""

    step: int
    loss: float
    #: Loss without ``validation.holdout_word`` minus loss with it (lower half of the timesteps);
    #: ``None`` without the setting.
    gain: float | None = None

    def facts(self) -> dict:
        return {"val_loss": self.loss} | ({} if self.gain is None else {"word_gain": self.gain})

    def describe(self) -> str:
        return f"held-out loss {self.loss:.5f}" + ("" if self.gain is None else f", word gain {self.gain:+.5f}")


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
        self.word = validation.holdout_word.strip() or None
        if self.word and examples and not any(
                without_word(_full_caption(ex), self.word) is not None for ex in examples):
            raise ConfigError(f"validation.holdout_word: {self.word!r} is in none of the held-out images' captions "
                              f"(e.g. {_full_caption(examples[0])!r}); give the word that names what the run "
                              "teaches, as the captions write it, or leave holdout_word empty")
        self.history: list[Evaluation] = []
        self.best: Evaluation | None = None
        self.evals_without_improvement = 0
        self.best_checkpoint: dict | None = None

    @property
    def criterion(self) -> str:
        """What picks the best checkpoint: ``"word gain"`` (higher is better) or ``"loss"`` (lower)."""
        return "word gain" if self.word else "loss"

    def _better(self, a: float | None, b: float | None) -> bool:
        """Whether criterion value ``a`` beats ``b`` (``None``: no value yet)."""
        if a is None or not math.isfinite(a):
            return False
        return b is None or (a > b if self.word else a < b)

    def _value(self, facts: dict | Evaluation | None) -> float | None:
        if facts is None:
            return None
        if isinstance(facts, Evaluation):
            return facts.gain if self.word else facts.loss
        return facts.get("word_gain" if self.word else "val_loss")

    def due(self, step: int, total: int) -> bool:
        every = self.cfg.loss_every
        return (every and step % every == 0) or step == total

    @torch.no_grad()
    def evaluate(self, family, components, objective, method, device: torch.device,
                 autocast_dtype: torch.dtype | None, step: int = 0) -> Evaluation:
        """Mean held-out loss with fixed timesteps, noise, captions and VAE samples (and the word gain).

        Call it with the modules in eval mode (a run does, inside ``Run.evaluating()``).
        """
        timesteps = objective.holdout_timesteps(self.cfg.loss_timesteps)
        low = set(sorted(timesteps.tolist())[:(len(timesteps) + 1) // 2])  # the word gain's timesteps
        total, count = 0.0, 0
        gain, gain_count = 0.0, 0
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), autocast(device, autocast_dtype):
            for indices in self.batches:
                start = indices[0]
                torch.manual_seed(derived_seed(self.seed, "holdout", start))
                collated = collate([self.dataset[(0, i)] for i in indices])
                batch = method.prepare_batch(collated)
                latents = batch_latents(family, components, batch, device).float()
                conditioning = batch_conditioning(family, components, batch, device, trains_text=False)
                # The word comes out of the captions as written, before the method rewrites them (a textual
                # inversion token into its vectors); prepared after the draws above, which stay as without it.
                plain = self._without_word(collated)
                if plain is not None:
                    plain = method.prepare_batch(plain)
                    plain_conditioning = batch_conditioning(family, components, plain, device, trains_text=False)
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
                    if plain is not None and int(t) in low:
                        plain_losses = diffusion_losses(family, components, objective, latents, plain_conditioning,
                                                        plain, timesteps=t_batch, noise=noise)
                        gain += float((plain_losses - losses).sum())
                        gain_count += len(indices)
        return Evaluation(step, total / max(count, 1), gain / max(gain_count, 1) if self.word else None)

    def _without_word(self, batch):
        """``batch`` with the word taken out of its captions (captions without it unchanged); ``None``
        without ``holdout_word``."""
        if not self.word:
            return None
        captions = [without_word(c, self.word) for c in batch.captions]
        return dataclasses.replace(batch, captions=[o if c is None else c for c, o in zip(captions, batch.captions,
                                                                                              strict=True)],
                                   conditioning=None)

    def record(self, evaluation: Evaluation) -> bool:
        """Note an evaluation; True if it is the best so far (by :attr:`criterion`)."""
        self.history.append(evaluation)
        if self._better(self._value(evaluation), self._value(self.best)):
            self.best = evaluation
            self.evals_without_improvement = 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.cfg.patience) and self.evals_without_improvement >= self.cfg.patience

    def checkpoint_facts(self, step: int) -> dict | None:
        """Held-out facts for a checkpoint's info.json (``None`` if no evaluation happened at ``step``)."""
        if not self.history or self.history[-1].step != step:
            return None
        latest = self.history[-1]
        is_best = self.best_checkpoint is None or self._better(self._value(latest), self._value(self.best_checkpoint))
        return latest.facts() | {"best": is_best}

    def mark_checkpoint(self, checkpoints: Path, folder: Path, step: int, facts: dict | None) -> None:
        """Point ``checkpoints/best.json`` at ``folder`` if it holds the best evaluation so far (:attr:`criterion`)."""
        if not facts or not facts["best"]:
            return
        self.best_checkpoint = {"checkpoint": folder.name, "step": step,
                                **{k: v for k, v in facts.items() if k != "best"}, "by": self.criterion}
        atomic_write_text(checkpoints / BEST_FILE, json.dumps(self.best_checkpoint, indent=2))

    def resume(self, checkpoints: Path, step: int) -> None:
        """A resumed run goes on from the best checkpoint marked before ``step`` (``best.json``), so a worse
        later evaluation never takes its mark; marks made by the other criterion, after ``step``, or
        unreadable (the next evaluation marks afresh) are not carried over."""
        try:
            best = read_best(checkpoints)
        except (OSError, ValueError):
            return
        if (not isinstance(best, dict) or not isinstance(best.get("step"), int) or best["step"] > step
                or best.get("by", "loss") != self.criterion or not isinstance(self._value(best), (int, float))):
            return
        self.best_checkpoint = best
        self.best = Evaluation(best["step"], best.get("val_loss", math.nan), best.get("word_gain"))

    def best_folder(self, checkpoints: Path) -> Path | None:
        return checkpoints / self.best_checkpoint["checkpoint"] if self.best_checkpoint else None


def read_best(checkpoints: Path) -> dict | None:
    """The ``best.json`` record of a run's checkpoints folder, if any."""
    path = checkpoints / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _full_caption(example: Example) -> str:
    """The caption with ``data.trigger`` (training adds it), for finding the word."""
    return " ".join(part for part in (example.trigger, example.caption) if part)
