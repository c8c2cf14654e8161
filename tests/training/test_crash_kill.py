"""``kill -9`` at any moment of a save never leaves a newest checkpoint that fails to load.

The kills are placed by counting the file-system calls a save makes (create, fsync, rename,
delete, ...) and killing the saver from inside the chosen call, before or after it runs: every
point between two of a save's steps is reached, whatever the machine's load.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal

import pytest
import torch

from difftune.training import checkpoint as ckpt

pytestmark = pytest.mark.slow

#: How long one forked saver may take (it needs well under a second; a hang fails instead of blocking).
CHILD_SECONDS = 120

# The calls through which a save changes the disk; a kill between any two of them must be safe.
_HOOKED = [(os, "open"), (os, "close"), (os, "fsync"), (os, "replace"), (os, "rename"), (os, "mkdir"),
           (os, "unlink"), (shutil, "rmtree")]


def _count_calls(on_call) -> None:
    """Route every hooked call through ``on_call(before: bool)``, once before and once after it runs."""
    for module, name in _HOOKED:
        original = getattr(module, name)

        def hooked(*args, _original=original, **kwargs):
            on_call(True)
            result = _original(*args, **kwargs)
            on_call(False)
            return result

        setattr(module, name, hooked)


def _state(step: int) -> ckpt.TrainingState:
    n = 2**16
    return ckpt.TrainingState(step, {"w": torch.full((n,), float(step))},
                              {"state": {0: {"m": torch.full((n,), -float(step))}}}, {"last_epoch": step})


def _save_until_killed(root, start: int, kill_at: int, saved) -> None:
    """Save checkpoints (each step twice, to exercise replacing a step) and prune, until the
    ``kill_at``-th hooked call event, where the process kills itself with SIGKILL. ``saved`` (shared
    memory) holds the newest step whose save returned."""
    try:
        torch.set_num_threads(1)  # a forked child must not use the OpenMP pool it inherited
        events = 0

        def on_call(before: bool) -> None:
            nonlocal events
            events += 1
            if events == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        _count_calls(on_call)
        step, again = start, False
        while True:
            step = step if again else step + 1
            ckpt.save_checkpoint(root, step, _state(step), {"again": again})
            saved.value = step
            ckpt.prune(root, keep=2)
            again = not again
    finally:
        os._exit(0)


def _events_per_save(tmp_path) -> int:
    """How many hooked call events one save and prune make (counted in a child, hooks stay there)."""
    fork = multiprocessing.get_context("fork")
    reader, writer = fork.Pipe(duplex=False)

    def count() -> None:
        torch.set_num_threads(1)  # a forked child must not use the OpenMP pool it inherited (it can hang)
        events = 0

        def on_call(before: bool) -> None:
            nonlocal events
            events += 1

        _count_calls(on_call)
        for step in (1, 2, 3):
            ckpt.save_checkpoint(tmp_path / "probe", step, _state(step), {})
            ckpt.prune(tmp_path / "probe", keep=2)
        writer.send(events // 3)
        os._exit(0)

    child = fork.Process(target=count)
    child.start()
    assert reader.poll(CHILD_SECONDS), "the counting saver sent nothing (it hung or failed)"
    per_save = reader.recv()
    child.join(CHILD_SECONDS)
    return per_save


def test_sigkill_during_saves_never_damages_the_newest_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    per_save = _events_per_save(tmp_path)
    assert per_save >= 10, f"a save made only {per_save} hooked calls: the hooks miss how it writes"
    fork = multiprocessing.get_context("fork")  # no re-import of torch per kill: keeps the test short
    newest = 0
    # Every point of a first save of a step and of its replacement (each child saves a new step,
    # then saves it again), plus a few beyond, each from the state the previous kill left.
    kills = 2 * per_save + 5
    for i, kill_at in enumerate(range(1, kills + 1)):
        saved = fork.Value("i", newest, lock=False)
        child = fork.Process(target=_save_until_killed, args=(root, newest, kill_at, saved))
        child.start()
        child.join(CHILD_SECONDS)
        if child.exitcode is None:
            child.kill()
            pytest.fail(f"kill {i}: the saver neither reached call event {kill_at} nor ended (hung)")
        assert child.exitcode == -signal.SIGKILL, f"kill {i}: the saver ended without being killed"

        # Every folder named like a checkpoint is complete: staging folders and moved-aside copies
        # are the only things a kill can leave, and they never look like a checkpoint.
        for folder in ckpt.list_checkpoints(root):
            assert ckpt.verify(folder) is None, (i, folder, ckpt.verify(folder))
        found = ckpt.find_resumable(root, log=lambda m: None)
        if found is None:
            assert saved.value == 0, f"kill {i}: the checkpoint of step {saved.value} disappeared"
            continue
        state = ckpt.load_checkpoint(found)
        assert found.name == f"step-{state.step}"
        assert torch.equal(state.trainable["w"], torch.full_like(state.trainable["w"], float(state.step)))
        assert state.scheduler == {"last_epoch": state.step}
        assert state.step >= saved.value, (f"kill {i} (call event {kill_at}): a save of step {saved.value} "
                                           f"had returned, but the newest resumable step is {state.step}")
        newest = state.step
        assert not [p for p in root.iterdir() if p.name.startswith(".")], "leftovers not cleaned"
    assert newest >= 3, f"only {newest} saves completed across {kills} kills"
