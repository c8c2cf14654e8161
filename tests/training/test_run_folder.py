"""A run folder belongs to one run: locked while it runs; another run's results are never silently reused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from difftune.cli import main
from difftune.errors import DifftuneError
from difftune.training.run_folder import FINISHED, LOCK


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_runs_folder_is_refused_then_overwritten_or_numbered_when_asked(train_run, tmp_path):
    first = train_run(train={"checkpoint_every": 2, "max_steps": 3})
    out = first.output_dir
    assert (out / FINISHED).is_file() and (out / "checkpoints" / "step-2").is_dir()
    before = snapshot(out)
    with pytest.raises(DifftuneError, match=f"output.dir: {out} holds another run's results .*nothing was written"):
        train_run(train={"max_steps": 2})
    assert snapshot(out) == before  # not even config.toml was rewritten
    numbered = train_run(train={"max_steps": 2}, output={"existing": "new"})
    assert numbered.output_dir == out.parent / "out-2" and snapshot(out) == before
    assert f'dir = "{out.parent / "out-2"}"' in (numbered.output_dir / "config.toml").read_text()
    (out / "notes.txt").write_text("mine")  # a file the run did not write stays
    train_run(train={"max_steps": 2}, output={"existing": "overwrite"})
    # the old run's checkpoints are gone with it; the new run's last step is its own
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert snapshot(out)["checkpoints/step-2/info.json"] != before["checkpoints/step-2/info.json"]
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(p.name for p in (out.parent / "out-2" / "logs").iterdir())
    assert {"README.md", "pytorch_lora_weights.safetensors"} <= set(json.loads((out / FINISHED).read_text())["files"])


def test_the_refusal_suggests_resuming_only_when_there_is_a_checkpoint(tmp_path):
    from difftune.config.schema import OutputConfig
    from difftune.training.run_folder import RunFolder

    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (out / "README.md").write_text("card")
    (out / "checkpoints").mkdir()  # emptied by hand: nothing to continue from
    with pytest.raises(DifftuneError) as caught:
        RunFolder(OutputConfig(dir=str(out)), "latest").check()
    assert "left no checkpoint to continue from: replace it with --overwrite" in str(caught.value)
    assert "resume" not in str(caught.value)
    (out / "checkpoints" / "step-3").mkdir()
    with pytest.raises(DifftuneError, match="Continue it with --set train.resume=latest, replace it with --overwrite"):
        RunFolder(OutputConfig(dir=str(out)), None).check()


def test_nothing_is_written_when_the_model_does_not_load(train_run, tmp_path):
    bad_model = tmp_path / "bad-model"
    bad_model.mkdir()
    (bad_model / "model_index.json").write_text('{"_class_name": "NotAPipeline"}')
    out = tmp_path / "out"
    with pytest.raises(DifftuneError, match="could not tell which model family"):
        train_run(model={"path": str(bad_model)})
    assert not out.exists()


HOLD = textwrap.dedent("""
    import fcntl, json, os, socket, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_folder_in_use_is_refused_naming_the_holder_and_a_killed_run_leaves_no_stale_lock(train_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DifftuneError, match=f"{out} is in use by a running difftune run \\(pid {holder.pid} on "
                                                "host "):
            train_run(train={"max_steps": 1})
        with pytest.raises(DifftuneError, match="in use by a running difftune run"):
            train_run(train={"max_steps": 1, "resume": "latest"})  # resuming into a running run too
    finally:
        holder.kill()  # as a crash: the system drops the lock
        holder.wait()
    assert train_run(train={"max_steps": 1}).steps == 1
    assert not (out / FINISHED).is_file() or json.loads((out / LOCK).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("where", ["file", "/dev/null/run", "/proc/difftune-run"])
def test_an_output_dir_that_cannot_be_a_folder_is_one_line(tiny_sd, shapes_data, tmp_path, capsys, where):
    out = tmp_path / "a-file" if where == "file" else where
    if where == "file":
        out.write_text("not a folder")
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\npath = "{tiny_sd}"\n[data]\npath = "{shapes_data}"\n[train]\nmax_steps = 1\n'
                      f'mixed_precision = "no"\n[logging]\nreport_to = "none"\n[output]\ndir = "{out}"\n')
    assert main(["train", str(config)]) == (2 if where == "file" else 1)  # a file: refused by validate already
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("difftune: error:") == 1
    assert err.strip().splitlines()[-1].startswith("difftune: error: output.dir: ")
    assert str(out) in err.strip().splitlines()[-1]
