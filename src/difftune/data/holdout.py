"""The held-out split (``validation.holdout``): images the model never trains on, for a validation loss."""

from __future__ import annotations

import dataclasses

import torch

from difftune.config.schema import DataConfig, ValidationConfig
from difftune.data.sources import Example, load_examples
from difftune.errors import DifftuneError


def split(examples: list[Example], data: DataConfig, validation: ValidationConfig,
          seed: int) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples): a fraction picked by ``seed``, or a separate folder."""
    holdout = validation.holdout
    if holdout is None:
        return examples, []
    if isinstance(holdout, str):
        # A separate folder: only the folder itself, never the training datasets listed in data.datasets.
        return examples, load_examples(dataclasses.replace(data, path=holdout, datasets=[])).examples
    count = max(1, round(len(examples) * holdout))
    if count >= len(examples):
        raise DifftuneError(
            f"validation.holdout: {holdout} of {len(examples)} images leaves none to train on; "
            "lower the fraction or give a folder"
        )
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])
