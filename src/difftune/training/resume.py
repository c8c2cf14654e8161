"""What a checkpoint records about its run, and whether a run may resume from it.

A checkpoint's ``info.json`` holds the run's flat config, a fingerprint of the training examples
and the data position. On resume the config is compared key by key: changes to the model or the
method, or different training data, make the resumed run meaningless and are refused unless
``train.resume_force`` is set; other changes are listed and allowed.
"""

from __future__ import annotations

import hashlib
import json

from difftune.config.schema import Config
from difftune.errors import DifftuneError
from difftune.training.checkpoint import TrainingState, set_rng_state
from difftune.training.run import RESUME_NEUTRAL, config_hash, flat_config

#: Changing these trains a different thing: resuming would mix two runs.
REFUSED = ("model.", "method.")
#: Settings that never enter the computation (apart from how long it runs).
BENIGN = (*RESUME_NEUTRAL, "train.max_steps", "train.epochs", "train.max_nan_steps", "data.cache_dir")
IGNORED = ("train.resume", "train.resume_force")


def dataset_fingerprint(examples) -> str:
    """Hash of the sorted (name, content hash, caption, trigger, dataset) of the training examples."""
    rows = sorted((ex.name, ex.digest, ex.caption, ex.trigger, ex.dataset) for ex in examples)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def data_position(order, micro_batch: int) -> tuple[int, int]:
    """(epoch, micro-batch within the epoch) of this process's ``micro_batch``-th micro-batch."""
    if hasattr(order, "position"):
        return order.position(micro_batch)
    return divmod(micro_batch, order.batches_per_epoch)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def checkpoint_info(config: Config, fingerprint: str, num_examples: int, order, micro_batch: int,
                    world: int, skipped: int) -> dict:
    epoch, batch = data_position(order, micro_batch)
    return {
        "config_hash": config_hash(config),
        "config": _jsonable(flat_config(config)),
        "data": {"epoch": epoch, "batch": batch, "micro_batch": micro_batch, "fingerprint": fingerprint,
                 "examples": num_examples},
        "world_size": world,
        "skipped_steps": skipped,
    }


def _matches(key: str, names) -> bool:
    return any(key == n.rstrip(".") or key.startswith(n if n.endswith(".") else n + ".") for n in names)


def check_compatible(info: dict, config: Config, fingerprint: str, world: int, log) -> None:
    """Report how the run differs from the checkpoint's; raise if that makes resuming meaningless."""
    force = config.train.resume_force
    saved = info.get("config")
    if saved is None:  # written before difftune recorded the config
        if info.get("config_hash") not in (None, config_hash(config)):
            log("warning: the config differs from the one the checkpoint was written with; resuming anyway")
        return
    current = _jsonable(flat_config(config))
    changed = sorted(k for k in saved.keys() | current.keys()
                     if saved.get(k) != current.get(k) and not _matches(k, IGNORED))

    def describe(keys):
        return ", ".join(f"{k} ({saved.get(k)!r} → {current.get(k)!r})" for k in keys)

    refused = [k for k in changed if _matches(k, REFUSED)]
    problems = []
    if refused:
        problems.append(f"changed settings: {describe(refused)}")
    saved_data = info.get("data", {})
    if saved_data.get("fingerprint") not in (None, fingerprint):
        problems.append(f"the training images or captions changed (the checkpoint saw {saved_data.get('examples')} "
                        "examples with other names, contents or captions)")
    if problems:
        text = "; ".join(problems)
        if not force:
            raise DifftuneError(
                f"train.resume: the checkpoint belongs to a different run: {text}. Resuming would mix two runs; "
                "undo the change, start a new run in another output.dir, or force it with "
                "train.resume_force = true (difftune train --force-resume)"
            )
        log(f"warning: resuming anyway (train.resume_force): {text}")
    benign = [k for k in changed if not _matches(k, REFUSED) and _matches(k, BENIGN) and not k.startswith(
        "validation.holdout")]
    others = [k for k in changed if k not in refused and k not in benign]
    if others:
        log(f"warning: these settings changed since the checkpoint and change the rest of the run: {describe(others)}")
    if benign:
        note = f"note: changed since the checkpoint (fine to resume): {describe(benign)}"
        if any(k in ("train.max_steps", "train.epochs") for k in benign) and config.train.lr_scheduler != "constant":
            note += f"; the {config.train.lr_scheduler} schedule now spans the new length"
        log(note)
    if info.get("world_size", world) != world:
        log(f"warning: the checkpoint was written by {info['world_size']} process(es), this run has {world}: "
            "the data order from here differs from an uninterrupted run")


def resume_micro_batch(state: TrainingState, gradient_accumulation: int) -> int:
    """The micro-batch this process continues from (the sampler's ``start``)."""
    return state.extra["info"].get("data", {}).get("micro_batch", state.step * gradient_accumulation)


def restore_rng(state: TrainingState, rank: int, log) -> None:
    """This process's Python, NumPy and torch random state (the loop also reseeds torch every step)."""
    if "rng" in state.extra:
        set_rng_state(state.extra["rng"])
    else:
        log(f"note: the checkpoint has no random state for process {rank}; the loop reseeds every step anyway")
