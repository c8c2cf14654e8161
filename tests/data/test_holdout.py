"""The held-out split: deterministic, disjoint from training, following the seed; or a separate folder."""

from __future__ import annotations

from difftune import load_config
from difftune.data.holdout import split
from difftune.data.sources import load_examples
from difftune.tiny import make_tiny_dataset


def test_split_is_deterministic_disjoint_and_follows_the_seed(run_config, tiny_sd, tmp_path):
    data = make_tiny_dataset(tmp_path / "d", n=10, size=32)
    cfg = load_config(data=run_config(tiny_sd, data, tmp_path / "o", validation={"holdout": 0.3}))
    train_a, held_a = split(load_examples(cfg.data).examples, cfg.data, cfg.validation, cfg.train.seed)
    train_b, held_b = split(load_examples(cfg.data).examples, cfg.data, cfg.validation, cfg.train.seed)
    assert [e.name for e in held_a] == [e.name for e in held_b] and len(held_a) == 3
    assert not {e.name for e in train_a} & {e.name for e in held_a} and len(train_a) == 7
    other = load_config(data=run_config(tiny_sd, data, tmp_path / "o", validation={"holdout": 0.3},
                                        train={"seed": 7}))
    assert [e.name for e in split(load_examples(other.data).examples, other.data, other.validation, other.train.seed)[1]] != [e.name for e in held_a]


def test_holdout_folder_is_used_whole(run_config, tiny_sd, shapes_data, tmp_path):
    folder = make_tiny_dataset(tmp_path / "val", n=2, size=32, seed=3)
    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "o", validation={"holdout": str(folder)}))
    train, held = split(load_examples(cfg.data).examples, cfg.data, cfg.validation, cfg.train.seed)
    assert len(train) == 4 and len(held) == 2
