"""A finished run continues from its last step (raise max_steps, resume) as exactly as any resume, and a
resume that changes the learning rate runs with the new rate and records what ran."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from difftune import load_config
from difftune.training.setup import setup

ADAPTER = "pytorch_lora_weights.safetensors"
CONSTANT = {"lr_scheduler": "constant", "checkpoint_every": 2}


def steps_kept(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_the_last_step_is_checkpointed_and_a_finished_run_continues_bit_exactly(train_run, tmp_path):
    whole = train_run("whole", train={**CONSTANT, "max_steps": 5})
    part = train_run("part", train={**CONSTANT, "max_steps": 3, "checkpoints_keep": 1})
    assert steps_kept(part.output_dir) == ["step-3"]  # the last step, not only steps 2, 4, ...
    more = train_run("part", train={**CONSTANT, "max_steps": 5, "checkpoints_keep": 1, "resume": "latest"})
    assert more.output_dir == part.output_dir and steps_kept(part.output_dir) == ["step-5"]
    a, b = load_file(whole.output_dir / ADAPTER), load_file(more.output_dir / ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_every_0_still_checkpoints_the_last_step(train_run):
    done = train_run(train={"checkpoint_every": 0, "max_steps": 2})
    assert steps_kept(done.output_dir) == ["step-2"]


def test_resume_with_a_new_learning_rate_runs_with_it_and_says_so(train_run, run_config, tiny_sd, shapes_data,
                                                                  tmp_path):
    train_run(train={"max_steps": 2, "checkpoint_every": 2, "lr_scheduler": "linear", "learning_rate": 1e-3})
    raw = run_config(tiny_sd, shapes_data, tmp_path / "out",
                     train={"max_steps": 4, "checkpoint_every": 2, "lr_scheduler": "linear", "learning_rate": 4e-3,
                            "resume": "latest", "adam_beta1": 0.8})
    messages: list[str] = []
    run = setup(load_config(data=raw), log=messages.append)
    try:
        expected = 4e-3 * (4 - 2) / 4  # the new rate on the linear schedule, at step 2 of 4
        assert [g["lr"] for g in run.optimizer.param_groups] == [expected]
        assert run.scheduler.get_last_lr() == [expected]
        assert [g["betas"][0] for g in run.optimizer.param_groups] == [0.8]
        said = " ".join(messages)
        assert "train.learning_rate (0.001 → 0.004)" in said and "applied from step 2" in said
    finally:
        run.folder.release()
    result = train_run(train={"max_steps": 4, "checkpoint_every": 2, "lr_scheduler": "linear", "learning_rate": 4e-3,
                              "resume": "latest", "adam_beta1": 0.8})
    card = (result.output_dir / "README.md").read_text()
    assert "0.004 from step 2 (before: 0.001 from step 0)" in card
    assert 'learning_rate = 0.004' in (result.output_dir / "config.toml").read_text()


def test_the_card_records_every_rate_a_run_trained_with_in_order():
    from difftune.training.checkpointing import learning_rate_segments
    from difftune.training.finish import rate_history
    from difftune.training.resume import CheckpointInfo

    said: list[str] = []
    first = learning_rate_segments(CheckpointInfo(step=2), 1e-3, 4e-3, said.append)  # older checkpoint: no history
    second = learning_rate_segments(CheckpointInfo(step=4, lr_segments=first), 4e-3, 2e-3, said.append)
    assert rate_history(second) == "0.002 from step 4 (before: 0.001 from step 0, 0.004 from step 2)"
    same = learning_rate_segments(CheckpointInfo(step=6, lr_segments=second), 2e-3, 2e-3, said.append)
    assert same == second and len(said) == 2  # an unchanged rate adds nothing and says nothing
    # changed again at the step it was last changed (no step trained with 0.002): that stretch is replaced
    again = learning_rate_segments(CheckpointInfo(step=4, lr_segments=second), 2e-3, 1e-3, said.append)
    assert rate_history(again) == "0.001 from step 4 (before: 0.001 from step 0, 0.004 from step 2)"
