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
        n = 2**19  # 2 MB of float32 weights, 2 MB of optimizer state
        step, again = start, False
        while True:
            step = step if again else step + 1
            state = ckpt.TrainingState(step, {"w": torch.full((n,), float(step))},
                                       {"state": {0: {"m": torch.full((n,), -float(step))}}}, {"last_epoch": step}, {})
            ckpt.save_checkpoint(root, state, {"again": again})
            ckpt.prune(root, keep=2)
            again = not again
    finally:
        os._exit(0)


def test_sigkill_during_saves_never_damages_the_newest_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    rng = random.Random(1234)
    fork = multiprocessing.get_context("fork")  # no re-import of torch per kill: keeps the test short
    newest, kills = 0, 25
    for i in range(kills):
        child = fork.Process(target=_save_forever, args=(root, newest))
        child.start()
        time.sleep(rng.uniform(0.01, 0.35))
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
    assert newest >= 5, "the saver hardly ran; the kills did not land during saves"
