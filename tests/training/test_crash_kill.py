"""``kill -9`` at any moment of a save never leaves a newest checkpoint that fails to load."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

from difftune.training import checkpoint as ckpt

pytestmark = pytest.mark.slow


def _save_forever(root, start: int) -> None:
    """Save checkpoints without pause (each step twice, to exercise replacing a step) and prune."""
    try:
        # A forked child must not use the OpenMP pool it inherited from the parent (it can hang).
        torch.set_num_threads(1)
        n = 2**19  # 2 MB of float32 weights, 2 MB of optimizer state
        step, again = start, False
        while True:
            step = step if again else step + 1
            state = ckpt.TrainingState(step, {"w": torch.full((n,), float(step))},
                                       {"state": {0: {"m": torch.full((n,), -float(step))}}}, {"last_epoch": step})
            ckpt.save_checkpoint(root, step, state, {"again": again})
            ckpt.prune(root, keep=2)
            again = not again
    finally:
        os._exit(0)


def _seconds_per_save(tmp_path) -> float:
    """How long one save takes on this machine right now, so the kills land inside saves."""
    n = 2**19
    started = time.perf_counter()
    for step in range(1, 4):
        state = ckpt.TrainingState(step, {"w": torch.zeros(n)}, {"state": {0: {"m": torch.zeros(n)}}}, {})
        ckpt.save_checkpoint(tmp_path / "probe", step, state, {})
    return (time.perf_counter() - started) / 3


def test_sigkill_during_saves_never_damages_the_newest_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    rng = random.Random(1234)
    save_time = _seconds_per_save(tmp_path)
    fork = multiprocessing.get_context("fork")  # no re-import of torch per kill: keeps the test short
    newest, kills = 0, 25
    for i in range(kills):
        child = fork.Process(target=_save_forever, args=(root, newest))
        child.start()
        # Anywhere from the first save's start to a few saves in (the fork itself is near-instant).
        time.sleep(rng.uniform(0.0, 4 * save_time))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL

        # Every folder named like a checkpoint is complete: staging folders and moved-aside copies
        # are the only things a kill can leave, and they never look like a checkpoint.
        for folder in ckpt.list_checkpoints(root):
            assert ckpt.verify(folder) is None, (i, folder, ckpt.verify(folder))
        found = ckpt.find_resumable(root, log=lambda m: None)
        if found is None:
            assert newest == 0, f"kill {i}: the checkpoint of step {newest} disappeared"
            continue
        state = ckpt.load_checkpoint(found)
        assert found.name == f"step-{state.step}"
        assert torch.equal(state.trainable["w"], torch.full_like(state.trainable["w"], float(state.step)))
        assert state.scheduler == {"last_epoch": state.step}
        assert state.step >= newest, f"kill {i}: resumable step went back from {newest} to {state.step}"
        newest = state.step
        assert not [p for p in root.iterdir() if p.name.startswith(".")], "leftovers not cleaned"
    assert newest >= 3, "the saver hardly ran; the kills did not land during saves"
