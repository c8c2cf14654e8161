"""Held-out loss: the same number for the same weights, best checkpoint, early stop."""

from __future__ import annotations

import json

import torch

from difftune import load_config
from difftune.data.holdout import split
from difftune.data.sources import load_examples
from difftune.training import holdout


def test_same_weights_give_the_same_held_out_loss(run_config, tiny_sd, shapes_data, tmp_path):
    from difftune.methods import METHODS
    from difftune.models import detect_family, get_family
    from difftune.models.loading import resolve_source
    from difftune.objectives import OBJECTIVES

    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "o", validation={"holdout": 0.5}))
    source = resolve_source(str(tiny_sd), None, None, None)
    family = get_family(detect_family(source, "auto"))
    components = family.load(source, dtype=torch.float32)
    method = METHODS.get("lora").build(cfg.method, family)
    method.prepare(components)
    objective = OBJECTIVES.get(family.objective)(family.objective_settings(components), cfg.train)
    _, held = split(load_examples(cfg.data).examples, cfg.data, cfg.validation, cfg.train.seed)
    evaluator = holdout.HeldOutLoss(held, cfg.data, cfg.validation, cfg.train.seed, cfg.train.batch_size)

    def evaluate():
        return evaluator.evaluate(family, components, objective, method, torch.device("cpu"), None)

    torch.manual_seed(123)
    first = evaluate()
    torch.rand(10)  # the global RNG moves on, as it does during training
    assert evaluate() == first
    with torch.no_grad():
        next(p for n, p in components.denoiser.named_parameters() if "lora_B" in n).add_(0.5)
    assert evaluate() != first


def test_early_stopping_bookkeeping(run_config, tiny_sd, shapes_data, tmp_path):
    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "o",
                                      validation={"holdout": 0.25, "patience": 2}))
    evaluator = holdout.HeldOutLoss([], cfg.data, cfg.validation, cfg.train.seed, cfg.train.batch_size)
    assert evaluator.record(1, 1.0) and not evaluator.should_stop
    assert not evaluator.record(2, 1.1) and not evaluator.should_stop
    assert evaluator.record(3, 0.9)
    assert not evaluator.record(4, 0.95) and not evaluator.record(5, 0.91)
    assert evaluator.should_stop and evaluator.best == (3, 0.9)


def test_run_logs_held_out_loss_and_marks_the_best_checkpoint(train_run):
    result = train_run(validation={"holdout": 0.25, "loss_every": 1},
                       train={"max_steps": 3, "checkpoint_every": 1, "checkpoints_keep": 1})
    assert [s for s, _ in result.val_losses] == [1, 2, 3]
    ckpts = result.output_dir / "checkpoints"
    best = holdout.read_best(ckpts)
    checkpointed = result.val_losses  # every step has a checkpoint, the final one too
    best_step, best_loss = min(checkpointed, key=lambda sl: sl[1])
    assert best == {"checkpoint": f"step-{best_step}", "step": best_step, "val_loss": best_loss}
    info = json.loads((ckpts / best["checkpoint"] / "info.json").read_text())
    assert info["holdout"] == {"val_loss": best_loss, "best": True}  # kept despite checkpoints_keep = 1
    assert any("held-out loss" in m for m in result.messages)
    assert "Held-out loss" in (result.output_dir / "README.md").read_text()
