"""What a checkpoint records about its run, and whether a run may resume from it.

A checkpoint's ``info.json`` (:class:`CheckpointInfo`) holds the run's flat config, a fingerprint
of the training examples and the data position. On resume the config is compared key by key:
changes to the model or the method, or different training data, make the resumed run meaningless
and are refused unless ``train.resume_force`` is set; other changes are listed and allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from difftune.config.active import non_default
from difftune.config.loader import flat_config
from difftune.config.schema import Config
from difftune.errors import DifftuneError
from difftune.training.checkpoint import TrainingState, set_rng_state

#: Keys whose change does not change what a resumed run computes.
RESUME_NEUTRAL = ("train.resume", "train.resume_force", "train.checkpoint_every", "train.checkpoints_keep",
                  "train.log_every", "train.max_nan_steps", "validation", "logging", "output", "data.num_workers")
#: Exceptions inside the neutral sections: the held-out split decides which images train.
RESUME_RELEVANT = ("validation.holdout",)
#: Changing these trains a different thing: resuming would mix two runs.
REFUSED = ("model.", "method.")
#: Settings that never enter the computation (apart from how long it runs).
BENIGN = (*RESUME_NEUTRAL, "train.max_steps", "train.epochs", "train.max_nan_steps", "data.cache_dir",
          "train.distributed", "train.fsdp_cpu_offload")
IGNORED = ("train.resume", "train.resume_force")


def resume_relevant(config: Config) -> dict[str, object]:
    return {
        k: v for k, v in flat_config(config).items()
        if k in RESUME_RELEVANT or not any(k == n or k.startswith(n + ".") for n in RESUME_NEUTRAL)
    }


def config_hash(config: Config) -> str:
    return hashlib.sha256(json.dumps(resume_relevant(config), sort_keys=True, default=str).encode()).hexdigest()


def dataset_fingerprint(examples) -> str:
    """Hash of the sorted (name, content hash, caption, trigger, dataset) of the training examples."""
    rows = sorted((ex.name, ex.digest, ex.caption, ex.trigger, ex.dataset) for ex in examples)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


@dataclass
class DataPosition:
    """Where in the data a checkpoint's run stood: this process's next micro-batch and what it was reading."""

    epoch: int
    batch: int
    micro_batch: int
    fingerprint: str | None = None
    examples: int | None = None


@dataclass
class CheckpointInfo:
    """``info.json``. Fields a checkpoint written by an older difftune lacks are ``None``."""

    step: int
    difftune_version: str | None = None
    config_hash: str | None = None
    #: The run's flat config (``section.key`` → value, JSON values).
    config: dict[str, Any] | None = None
    data: DataPosition | None = None
    world_size: int | None = None
    skipped_steps: int = 0
    #: Held-out facts at this step (``{"val_loss": ..., "best": ...}``), if evaluated then.
    holdout: dict | None = None
    #: ``[[step, learning rate], ...]``: the base rate from each step on (a resume may change it).
    lr_segments: list | None = None

    @classmethod
    def read(cls, info: dict) -> CheckpointInfo:
        data = info.get("data")
        known = {f.name for f in dataclasses.fields(DataPosition)}
        return cls(
            step=info["step"], difftune_version=info.get("difftune_version"), config_hash=info.get("config_hash"),
            config=info.get("config"), world_size=info.get("world_size"),
            data=DataPosition(**{k: v for k, v in data.items() if k in known}) if data else None,
            skipped_steps=info.get("skipped_steps", 0), holdout=info.get("holdout"),
            lr_segments=info.get("lr_segments"),
        )

    def to_json(self) -> dict:
        """The JSON written to ``info.json`` (unset fields left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def checkpoint_info(config: Config, step: int, fingerprint: str, num_examples: int, order, micro_batch: int,
                    world: int, skipped: int, version: str) -> CheckpointInfo:
    """What a checkpoint of this run at ``step`` records; ``micro_batch`` is this process's data position."""
    epoch, batch = order.position(micro_batch)
    return CheckpointInfo(
        step=step, difftune_version=version, config_hash=config_hash(config), config=_jsonable(flat_config(config)),
        data=DataPosition(epoch, batch, micro_batch, fingerprint, num_examples), world_size=world,
        skipped_steps=skipped,
    )


def _matches(key: str, names) -> bool:
    return any(key == n.rstrip(".") or key.startswith(n if n.endswith(".") else n + ".") for n in names)


@dataclass
class _Changes:
    saved: dict
    current: dict
    keys: list[str] = field(default_factory=list)

    def describe(self, keys) -> str:
        return ", ".join(f"{k} ({self.saved.get(k)!r} → {self.current.get(k)!r})" for k in keys)


def check_compatible(info: CheckpointInfo, config: Config, fingerprint: str, world: int, log) -> None:
    """Report how the run differs from the checkpoint's; raise if that makes resuming meaningless."""
    if info.config is None:  # written before difftune recorded the config
        if info.config_hash not in (None, config_hash(config)):
            log("warning: the config differs from the one the checkpoint was written with; resuming anyway")
        return
    current = _jsonable(flat_config(config))
    # Settings added to difftune after the checkpoint was written: at their default they keep the
    # behaviour the run had, so they are no change (set to something else, they are one).
    customised = {key for key, _ in non_default(config)}
    added = sorted(k for k in current.keys() - info.config.keys() if k not in customised)
    if added:
        log(f"note: settings added to difftune since the checkpoint was written keep their defaults: "
            f"{', '.join(added)}")
    changes = _Changes(info.config, current, sorted(
        k for k in info.config.keys() | current.keys()
        if info.config.get(k) != current.get(k) and not _matches(k, IGNORED) and k not in added))
    refused = [k for k in changes.keys if _matches(k, REFUSED)]
    _refuse_other_runs(info, changes, refused, fingerprint, config.train.resume_force, log)
    benign = [k for k in changes.keys if k not in refused and _matches(k, BENIGN)
              and not k.startswith("validation.holdout")]
    others = [k for k in changes.keys if k not in refused and k not in benign]
    if others:
        log(f"warning: these settings changed since the checkpoint and change the rest of the run: "
            f"{changes.describe(others)}")
    if benign:
        note = f"note: changed since the checkpoint (fine to resume): {changes.describe(benign)}"
        if any(k in ("train.max_steps", "train.epochs") for k in benign) and config.train.lr_scheduler not in ("constant", "constant_with_warmup"):
            note += f"; the {config.train.lr_scheduler} schedule now spans the new length"
        log(note)
    if info.world_size not in (None, world):
        log(f"warning: the checkpoint was written by {info.world_size} process(es), this run has {world}: "
            "the data order from here differs from an uninterrupted run")


def _refuse_other_runs(info: CheckpointInfo, changes: _Changes, refused: list[str], fingerprint: str, force: bool,
                       log) -> None:
    """Refuse (or, forced, warn about) a changed model or method, or different training data."""
    problems = []
    if refused:
        problems.append(f"changed settings: {changes.describe(refused)}")
    if info.data is not None and info.data.fingerprint not in (None, fingerprint):
        problems.append(f"the training images or captions changed (the checkpoint saw {info.data.examples} "
                        "examples with other names, contents or captions)")
    if not problems:
        return
    text = "; ".join(problems)
    if not force:
        raise DifftuneError(
            f"train.resume: the checkpoint belongs to a different run: {text}. Resuming would mix two runs; "
            "undo the change, start a new run in another output.dir, or force it with "
            "train.resume_force = true (difftune train --force-resume)"
        )
    log(f"warning: resuming anyway (train.resume_force): {text}")


def resume_micro_batch(info: CheckpointInfo, gradient_accumulation: int) -> int:
    """The micro-batch this process continues from (the batch order's ``start``)."""
    return info.data.micro_batch if info.data is not None else info.step * gradient_accumulation


def restore_rng(state: TrainingState, rank: int, log) -> None:
    """This process's Python, NumPy and torch random state (the loop also reseeds torch every step)."""
    if state.rng is not None:
        set_rng_state(state.rng)
    else:
        log(f"note: the checkpoint has no random state for process {rank}; the loop reseeds every step anyway")
