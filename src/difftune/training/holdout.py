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
from difftune.data.captions import without_word
from difftune.data.dataset import ImageCaptionDataset
from difftune.data.sources import Example
from difftune.errors import ConfigError
from difftune.fileio import atomic_write_text
from difftune.seeds import derived_seed
from difftune.training.loss import batch_conditioning, batch_latents, diffusion_losses
from difftune.training.precision import autocast

BEST_FILE = "best.json"
#: What picks the best checkpoint: the lowest held-out loss, or (``holdout_word``) the highest word gain.
LOSS, GAIN = "loss", "word gain"


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
    """Evaluates the held-out loss (and the word gain); :attr:`keeper` keeps the best evaluation."""

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
        self.keeper = BestKeeper(GAIN if self.word else LOSS, validation.patience)

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


class BestKeeper:
    """The best evaluation so far by one criterion (:data:`LOSS`: lowest; :data:`GAIN`: highest), the
    evaluations since it last improved (early stopping), and the checkpoint marked best (``best.json``)."""

    def __init__(self, by: str, patience: int = 0) -> None:
        self.by = by
        self.patience = patience
        self.history: list[Evaluation] = []
        self.best: Evaluation | None = None
        self.evals_without_improvement = 0
        #: The checkpoint marked best: its folder's name and its evaluation.
        self.marked: tuple[str, Evaluation] | None = None

    def value(self, evaluation: Evaluation | None) -> float | None:
        if evaluation is None:
            return None
        return evaluation.gain if self.by == GAIN else evaluation.loss

    def better(self, a: Evaluation | None, b: Evaluation | None) -> bool:
        """Whether ``a`` beats ``b`` (``None``: no evaluation yet)."""
        value, other = self.value(a), self.value(b)
        if value is None or not math.isfinite(value):
            return False
        return other is None or (value > other if self.by == GAIN else value < other)

    def record(self, evaluation: Evaluation) -> bool:
        """Note an evaluation; True if it is the best so far."""
        self.history.append(evaluation)
        if self.better(evaluation, self.best):
            self.best = evaluation
            self.evals_without_improvement = 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.evals_without_improvement >= self.patience

    def checkpoint_facts(self, step: int) -> dict | None:
        """Held-out facts for a checkpoint's info.json (``None`` if no evaluation happened at ``step``)."""
        if not self.history or self.history[-1].step != step:
            return None
        latest = self.history[-1]
        return latest.facts() | {"best": self.marked is None or self.better(latest, self.marked[1])}

    def mark_checkpoint(self, checkpoints: Path, folder: Path, step: int, facts: dict | None) -> None:
        """Point ``checkpoints/best.json`` at ``folder`` if it holds the best evaluation so far."""
        if not facts or not facts["best"]:
            return
        self.marked = (folder.name, self.history[-1])
        record = {"checkpoint": folder.name, "step": step, **{k: v for k, v in facts.items() if k != "best"},
                  "by": self.by}
        atomic_write_text(checkpoints / BEST_FILE, json.dumps(record, indent=2))

    def resume(self, checkpoints: Path, step: int) -> None:
        """A resumed run goes on from the checkpoint marked best before ``step`` (``best.json``), so a worse
        later evaluation never takes its mark; marks made by the other criterion, after ``step``, or
        unreadable (the next evaluation marks afresh) are not carried over."""
        mark = read_mark(checkpoints)
        if mark is None:
            return
        record, evaluation = mark
        if evaluation.step > step or record.get("by", LOSS) != self.by or not self.better(evaluation, None):
            return  # a later mark, the other criterion's, or its value missing
        self.marked = (record["checkpoint"], evaluation)
        self.best = evaluation

    def best_folder(self, checkpoints: Path) -> Path | None:
        return checkpoints / self.marked[0] if self.marked else None


def read_best(checkpoints: Path) -> dict | None:
    """The ``best.json`` record of a run's checkpoints folder, if any."""
    path = checkpoints / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_mark(checkpoints: Path) -> tuple[dict, Evaluation] | None:
    """The checkpoint marked best: ``best.json``'s record and the evaluation it holds; ``None`` if there is
    none, or it is unreadable or not a record this version writes (a step that is not a whole number, a
    loss or gain that is not a finite number: the next evaluation marks afresh)."""
    try:
        record = read_best(checkpoints)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("checkpoint"), str):
        return None
    step, loss, gain = record.get("step"), record.get("val_loss"), record.get("word_gain")
    if not _is_int(step) or not _is_finite(loss) or not (gain is None or _is_finite(gain)):
        return None
    return record, Evaluation(step, float(loss), None if gain is None else float(gain))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _full_caption(example: Example) -> str:
    """The caption with ``data.trigger`` (training adds it), for finding the word."""
    return " ".join(part for part in (example.trigger, example.caption) if part)
