"""Held-out loss: the same number for the same weights, best checkpoint, early stop."""

from __future__ import annotations

import json

import pytest
import torch

from difftune import load_config
from difftune.data.holdout import split
from difftune.data.sources import load_examples
from difftune.errors import ConfigError
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
        return evaluator.evaluate(family, components, objective, method, torch.device("cpu"), None).loss

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
    evaluator = holdout.HeldOutLoss([], cfg.data, cfg.validation, cfg.train.seed, cfg.train.batch_size).keeper
    E = holdout.Evaluation
    assert evaluator.by == "loss" and evaluator.patience == 2
    assert evaluator.record(E(1, 1.0)) and not evaluator.should_stop
    assert not evaluator.record(E(2, 1.1)) and not evaluator.should_stop
    assert evaluator.record(E(3, 0.9))
    assert not evaluator.record(E(4, 0.95)) and not evaluator.record(E(5, 0.91))
    assert evaluator.should_stop and evaluator.best == E(3, 0.9)


def test_with_a_holdout_word_the_highest_word_gain_is_best(run_config, tiny_sd, shapes_data, tmp_path):
    """The loss may rise while the word gain rises: the gain decides the best evaluation and early stopping."""
    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "o",
                                      validation={"holdout": 0.25, "patience": 2, "holdout_word": "sks"}))
    evaluator = holdout.HeldOutLoss([], cfg.data, cfg.validation, cfg.train.seed, cfg.train.batch_size).keeper
    E = holdout.Evaluation
    assert evaluator.by == "word gain"
    assert evaluator.record(E(1, 0.08, 0.01))
    assert evaluator.record(E(2, 0.16, 0.04))  # loss doubled, gain up: better
    assert not evaluator.record(E(3, 0.07, 0.02)) and not evaluator.record(E(4, 0.06, float("nan")))
    assert evaluator.should_stop and evaluator.best == E(2, 0.16, 0.04)


def test_word_gain_is_the_loss_without_the_word_minus_with_it(run_config, tiny_sd, shapes_data, tmp_path):
    """Checked against two plain held-out losses: the captions with the word, and the same captions without."""
    import dataclasses

    from difftune.methods import METHODS
    from difftune.models import detect_family, get_family
    from difftune.models.loading import resolve_source
    from difftune.objectives import OBJECTIVES

    def config(word):
        return load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "o",
                                           validation={"holdout": 0.5, "loss_timesteps": 1, "holdout_word": word}))

    cfg = config("sks")
    source = resolve_source(str(tiny_sd), None, None, None)
    family = get_family(detect_family(source, "auto"))
    components = family.load(source, dtype=torch.float32)
    method = METHODS.get("lora").build(cfg.method, family)
    method.prepare(components)
    with torch.no_grad():  # a LoRA that changes the output, so the captions matter through it too
        next(p for n, p in components.denoiser.named_parameters() if "lora_B" in n).add_(0.3)
    objective = OBJECTIVES.get(family.objective)(family.objective_settings(components), cfg.train)
    _, held = split(load_examples(cfg.data).examples, cfg.data, cfg.validation, cfg.train.seed)
    with_word = [dataclasses.replace(ex, caption=f"a sks {ex.caption}") for ex in held]
    without = [dataclasses.replace(ex, caption=f"a {ex.caption}") for ex in held]

    def evaluate(examples, c):
        evaluator = holdout.HeldOutLoss(examples, c.data, c.validation, c.train.seed, c.train.batch_size)
        return evaluator.evaluate(family, components, objective, method, torch.device("cpu"), None)

    both = evaluate(with_word, cfg)
    plain_cfg = config("")
    assert both.loss == pytest.approx(evaluate(with_word, plain_cfg).loss)
    expected = evaluate(without, plain_cfg).loss - both.loss
    assert expected != 0 and both.gain == pytest.approx(expected)
    with pytest.raises(ConfigError, match="validation.holdout_word: 'zorb' is in none of the held-out images' captions"):
        holdout.HeldOutLoss(with_word, *(lambda c: (c.data, c.validation, 0, 1))(config("zorb")))


def test_holdout_word_config_errors(run_config, tiny_sd, shapes_data, tmp_path):
    with pytest.raises(ConfigError, match="validation.holdout_word: needs validation.holdout"):
        load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "o", validation={"holdout_word": "sks"}))
    with pytest.raises(ConfigError, match="validation.holdout_word: empty"):
        load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "o",
                                    validation={"holdout": 0.25, "holdout_word": "  "}))


def test_a_resumed_run_keeps_the_best_checkpoint_marked_before(tmp_path):
    """A worse evaluation after a resume must not take the mark of a better one made before it."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    first = holdout.BestKeeper("loss")
    first.record(holdout.Evaluation(2, 0.5))
    first.mark_checkpoint(ckpts, ckpts / "step-2", 2, first.checkpoint_facts(2))
    resumed = holdout.BestKeeper("loss")
    resumed.resume(ckpts, 3)
    assert resumed.best == holdout.Evaluation(2, 0.5) and resumed.best_folder(ckpts) == ckpts / "step-2"
    assert not resumed.record(holdout.Evaluation(4, 0.9))
    resumed.mark_checkpoint(ckpts, ckpts / "step-4", 4, resumed.checkpoint_facts(4))
    assert holdout.read_best(ckpts)["step"] == 2
    assert resumed.record(holdout.Evaluation(5, 0.4))
    resumed.mark_checkpoint(ckpts, ckpts / "step-5", 5, resumed.checkpoint_facts(5))
    assert holdout.read_best(ckpts)["step"] == 5
    earlier = holdout.BestKeeper("loss")
    earlier.resume(ckpts, 3)  # resumed from a checkpoint before the marked one: the mark is not its past
    assert earlier.best is None
    other = holdout.BestKeeper("word gain")
    other.resume(ckpts, 6)  # marked by the loss: not this run's criterion
    assert other.best is None and other.marked is None


def test_run_logs_held_out_loss_and_marks_the_best_checkpoint(train_run):
    result = train_run(validation={"holdout": 0.25, "loss_every": 1},
                       train={"max_steps": 3, "checkpoint_every": 1, "checkpoints_keep": 1})
    assert [s for s, _ in result.val_losses] == [1, 2, 3]
    ckpts = result.output_dir / "checkpoints"
    best = holdout.read_best(ckpts)
    checkpointed = result.val_losses  # every step has a checkpoint, the final one too
    best_step, best_loss = min(checkpointed, key=lambda sl: sl[1])
    assert best == {"checkpoint": f"step-{best_step}", "step": best_step, "val_loss": best_loss, "by": "loss"}
    info = json.loads((ckpts / best["checkpoint"] / "info.json").read_text())
    assert info["holdout"] == {"val_loss": best_loss, "best": True}  # kept despite checkpoints_keep = 1
    assert any("held-out loss" in m for m in result.messages)
    assert "Held-out loss" in (result.output_dir / "README.md").read_text()


def test_a_run_with_a_holdout_word_marks_the_checkpoint_with_the_highest_gain(train_run):
    result = train_run(data={"trigger": "sks"}, validation={"holdout": 0.25, "loss_every": 1, "holdout_word": "sks"},
                       train={"max_steps": 3, "checkpoint_every": 1, "checkpoints_keep": 1})
    assert [s for s, _ in result.val_gains] == [1, 2, 3]
    best_step, best_gain = max(result.val_gains, key=lambda sg: sg[1])
    best = holdout.read_best(result.output_dir / "checkpoints")
    assert best["by"] == "word gain" and best["step"] == best_step and best["word_gain"] == best_gain
    assert any("word gain" in m for m in result.messages), result.messages
    assert "Held-out word gain (`sks`)" in (result.output_dir / "README.md").read_text()


def test_resuming_reads_the_best_mark_of_the_run_so_far(train_run):
    """The resumed run starts from best.json: an evaluation worse than the one marked there keeps the mark."""
    sections = dict(validation={"holdout": 0.25, "loss_every": 1},
                    train={"max_steps": 2, "checkpoint_every": 1, "checkpoints_keep": 3})
    first = train_run(**sections)
    ckpts = first.output_dir / "checkpoints"
    marked = {"checkpoint": "step-1", "step": 1, "val_loss": -1.0, "by": "loss"}  # better than any real loss
    (ckpts / holdout.BEST_FILE).write_text(json.dumps(marked))
    resumed = train_run(validation=sections["validation"],
                        train={**sections["train"], "max_steps": 3, "resume": "latest"})
    assert [s for s, _ in resumed.val_losses] == [3]
    assert holdout.read_best(ckpts) == marked
    card = (resumed.output_dir / "README.md").read_text()  # the card names the mark, not this segment's best
    assert "lowest -1.00000 at step 1" in card, card


def test_an_unreadable_best_mark_is_not_carried_over_a_resume(tmp_path):
    for text in ("{not json", "[1, 2]", '{"step": 2, "val_loss": 0.1}', '{"checkpoint": "step-2", "step": "two", '
                 '"val_loss": 0.1}', '{"checkpoint": "step-2", "step": 2, "val_loss": null}',
                 '{"checkpoint": "step-2", "step": 2, "val_loss": NaN}',
                 '{"checkpoint": "step-2", "step": 2, "val_loss": Infinity}',
                 '{"checkpoint": "step-2", "step": true, "val_loss": 0.1}',
                 '{"checkpoint": "step-2", "step": 2, "val_loss": 0.1, "word_gain": NaN, "by": "word gain"}'):
        (tmp_path / holdout.BEST_FILE).write_text(text)
        assert holdout.read_mark(tmp_path) is None, text  # what the web app's chart gets too
        keeper = holdout.BestKeeper("word gain" if "word_gain" in text else "loss")
        keeper.resume(tmp_path, 3)
        assert keeper.best is None and keeper.marked is None, text
        assert keeper.record(holdout.Evaluation(4, 0.9, 0.01))  # the next evaluation marks afresh


def test_a_best_mark_is_read_back_as_its_evaluation(tmp_path):
    record = {"checkpoint": "step-500", "step": 500, "val_loss": 0.16, "word_gain": 0.056, "by": "word gain"}
    (tmp_path / holdout.BEST_FILE).write_text(json.dumps(record))
    assert holdout.read_mark(tmp_path) == (record, holdout.Evaluation(500, 0.16, 0.056))
    assert holdout.read_mark(tmp_path / "nowhere") is None
