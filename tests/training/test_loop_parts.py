"""The loop's three parts used on their own: setup, steps and finish give what ``train`` gives."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from difftune import load_config
from difftune.training.finish import finish
from difftune.training.loop import train
from difftune.training.setup import setup
from difftune.training.step import train_step

ADAPTER = "pytorch_lora_weights.safetensors"


def test_setup_step_finish_equal_train(tmp_path, tiny_sd, shapes_data, run_config):
    def config(out):
        return load_config(data=run_config(tiny_sd, shapes_data, out, train={"max_steps": 3, "log_every": 100}))

    expected = train(config(tmp_path / "a"), log=lambda _m: None)

    run = setup(config(tmp_path / "b"), log=lambda _m: None)
    assert (run.step, run.total_steps, run.world) == (0, 3, 1)
    assert run.model.params and all(p.requires_grad for p in run.model.params)
    before = [p.detach().clone() for p in run.model.params]
    outcome = train_step(run)
    assert run.step == 1 and outcome.stepped and not outcome.bad and not outcome.stop_requested
    assert torch.isfinite(outcome.step_loss) and outcome.step_loss.dim() == 0
    assert any(not torch.equal(p, b) for p, b in zip(run.model.params, before, strict=True))
    while run.step < run.total_steps:
        train_step(run)
    result = finish(run)

    assert [f.relative_to(tmp_path / "b") for f in result.files] == [f.relative_to(tmp_path / "a")
                                                                      for f in expected.files]
    assert tmp_path / "b" / ADAPTER in result.files
    a, b = load_file(tmp_path / "a" / ADAPTER), load_file(tmp_path / "b" / ADAPTER)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical: train() adds nothing hidden
    assert (tmp_path / "b" / "README.md").is_file() and (tmp_path / "b" / "config.toml").is_file()
