"""SIGINT/SIGTERM stop a run after the current step with a checkpoint; a second Ctrl-C aborts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from difftune.training import checkpoint as ckpt
from difftune.training.signals import StopRequest


def test_first_signal_sets_flag_second_aborts_and_handlers_are_restored():
    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    messages = []
    with StopRequest(messages.append) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM and stop.exit_code == 143
        assert "SIGTERM received: finishing the current step" in messages[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before_int
    assert signal.getsignal(signal.SIGTERM) is before_term


@pytest.mark.slow
def test_cli_sigterm_writes_checkpoint_and_exits_143_with_resume_command(tmp_path, tiny_sd, shapes_data, run_config):
    from difftune.config.loader import dump_toml

    cfg = run_config(tiny_sd, shapes_data, tmp_path / "out",
                     train={"max_steps": 100000, "log_every": 1000, "checkpoint_every": 1, "checkpoints_keep": 2})
    config_file = tmp_path / "run.toml"
    config_file.write_text(dump_toml(cfg))
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-u", "-m", "difftune", "train", str(config_file),
                             "--set", "train.seed=7"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:  # once the first step is saved, the loop is running
            lines.append(line)
            if line.startswith("checkpoint: "):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 143, output
    assert f"to resume: difftune train {config_file} --set train.seed=7 --set train.resume=latest" in output
    found = ckpt.find_resumable(tmp_path / "out" / "checkpoints")
    assert found is not None and ckpt.load_checkpoint(found).step >= 1
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_cli_force_resume_flag_and_sigint_exit_code(tmp_path, tiny_sd, shapes_data, run_config, monkeypatch, capsys):
    import difftune.training.loop as loop
    from difftune.cli import main
    from difftune.config.loader import dump_toml
    from difftune.training.state import RunResult

    seen = []

    def fake_train(config, log=print):
        seen.append(config)
        return RunResult(tmp_path, [], 4, interrupted=signal.SIGINT)

    monkeypatch.setattr(loop, "train", fake_train)
    config_file = tmp_path / "run.toml"
    config_file.write_text(dump_toml(run_config(tiny_sd, shapes_data, tmp_path / "out")))
    code = main(["train", str(config_file), "--set", "train.resume=latest", "--force-resume"])
    assert code == 130
    assert seen[0].train.resume_force is True
    out = capsys.readouterr().out
    assert f"to resume: difftune train {config_file} --set train.resume=latest --force-resume" in out


def test_a_signal_while_the_run_is_built_stops_before_the_first_step(tmp_path, tiny_sd, shapes_data, run_config,
                                                                      monkeypatch):
    """Ctrl-C while models load (a slow Hub download, a big base): no step is trained, nothing is saved
    or exported, and the run can be started again with the resume command it gives."""
    from difftune.run_config import load_config
    from difftune.training import loop

    real_setup = loop.setup

    def setup_then_ctrl_c(config, log, folder):
        run = real_setup(config, log, folder)
        os.kill(os.getpid(), signal.SIGINT)  # arrives before setup returns, as during a long load
        return run

    monkeypatch.setattr(loop, "setup", setup_then_ctrl_c)
    out = tmp_path / "out"
    messages = []
    cfg = run_config(tiny_sd, shapes_data, out, train={"max_steps": 3})
    result = loop.train(load_config(data=cfg), log=messages.append)
    assert result.interrupted == signal.SIGINT
    text = "\n".join(messages)
    assert "stopped by SIGINT before the first step: nothing was trained or saved" in text, text
    assert ckpt.find_resumable(out / "checkpoints") is None
    assert not (out / "pytorch_lora_weights.safetensors").exists()

    monkeypatch.setattr(loop, "setup", real_setup)
    again = loop.train(load_config(data={**cfg, "train": {**cfg["train"], "resume": "latest"}}), log=messages.append)
    assert again.interrupted is None and (out / "pytorch_lora_weights.safetensors").is_file()
    assert [step for step, _ in again.losses][-1] == 3
