"""Buckets, repeats, dataset weights and caption options: deterministic, and resumable exactly."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from difftune import load_config
from difftune.config.schema import DataConfig
from difftune.data.buckets import make_buckets, nearest_bucket
from difftune.data.captions import final_caption, without_word
from difftune.data.dataset import ImageCaptionDataset
from difftune.data.sampling import BucketBatches, EpochPlan, ResumableBatches, batch_order, item_sizes
from difftune.data.sources import scan
from difftune.errors import ConfigError

from .helpers import png


def test_buckets_cover_the_area_and_pick_the_nearest_ratio():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 for h, w in buckets)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    h, w = nearest_bucket((720, 1280), buckets)  # 16:9 landscape
    assert w > h and abs(w / h - 16 / 9) < 0.2
    h, w = nearest_bucket((1280, 720), buckets)
    assert h > w


def _bucket_order(start=0, batch=2, seed=3, rank=0, world=1):
    sizes = [(32, 32)] * 5 + [(24, 40)] * 4 + [(40, 24)] * 3
    plan = EpochPlan([list(range(12))], [1], [None], seed)
    return BucketBatches(sizes, plan, batch, seed, rank, world, start), sizes


def test_bucket_batches_hold_one_bucket_and_resume_exactly():
    order, sizes = _bucket_order()
    full = list(itertools.islice(iter(order), 40))
    assert all(len({sizes[i] for _, i in b}) == 1 for b in full)
    assert all(len(b) == 2 for b in full)
    per_epoch = order.batches_per_epoch
    epoch0 = [i for b in full[:per_epoch] for _, i in b]
    assert set(epoch0) == set(range(12))  # nothing dropped: short buckets wrap round
    again, _ = _bucket_order()
    assert list(itertools.islice(iter(again), 40)) == full
    for start in (0, 1, per_epoch - 1, per_epoch, per_epoch + 3, 17):
        resumed, _ = _bucket_order(start=start)
        assert list(itertools.islice(iter(resumed), 10)) == full[start: start + 10]
    other, _ = _bucket_order(seed=4)
    assert list(itertools.islice(iter(other), 40)) != full


def test_bucket_batches_split_each_global_batch_between_processes():
    """Two processes with batch 2 see, together, the global batches of one process with batch 4: each
    takes its contiguous half, one bucket per global batch; resuming either at any batch continues it."""
    a, _ = _bucket_order(rank=0, world=2)
    b, _ = _bucket_order(rank=1, world=2)
    single, _ = _bucket_order(batch=4)
    assert a.batches_per_epoch == b.batches_per_epoch == single.batches_per_epoch
    n = 3 * single.batches_per_epoch
    two = [x + y for x, y in zip(itertools.islice(iter(a), n), itertools.islice(iter(b), n), strict=True)]
    assert two == list(itertools.islice(iter(single), n))
    resumed, _ = _bucket_order(rank=1, world=2, start=5)
    assert list(itertools.islice(iter(resumed), 4)) == [batch[2:] for batch in two[5:9]]


def test_plain_plan_matches_the_original_order():
    plan = EpochPlan([list(range(7))], [1], [None], seed=5)
    assert ResumableBatches(7, 1, 5, plan=plan).order(3) == ResumableBatches(7, 1, 5).order(3)


def test_repeats_and_weights():
    plan = EpochPlan([[0, 1], [2, 3, 4, 5, 6, 7, 8, 9]], [3, 1], [None, None], seed=0)
    counts = Counter(plan.order(0))
    assert plan.size == 14 and counts[0] == 3 and counts[5] == 1
    weighted = EpochPlan([[0, 1], list(range(2, 42))], [1, 1], [1.0, 1.0], seed=0)
    order = weighted.order(2)
    assert len(order) == 42 and sum(i < 2 for i in order) == 21  # half the epoch from the 2-image subject
    assert weighted.order(2) == order and weighted.order(3) != order
    resumable = ResumableBatches(42, 2, 0, plan=weighted, start=30)
    fresh = ResumableBatches(42, 2, 0, plan=weighted)
    assert list(itertools.islice(iter(resumable), 5)) == list(itertools.islice(iter(fresh), 35))[30:]


def test_caption_options():
    cfg = DataConfig(shuffle_tags=True, keep_tags=1, trigger="sks", trigger_position="prefix")
    caps = {final_caption("dog, red, ball, grass", "sks", cfg, random.Random(s)) for s in range(30)}
    assert all(c.startswith("sks, dog, ") for c in caps) and len(caps) > 1
    assert final_caption("a dog", "sks", DataConfig(trigger_position="suffix"), None) == "a dog, sks"
    drop = DataConfig(caption_dropout=0.5)
    dropped = [final_caption("a dog", "", drop, random.Random(s)) for s in range(200)]
    assert 60 < dropped.count("") < 140 and set(dropped) == {"", "a dog"}


def test_dataset_captions_are_seeded_per_epoch_and_index(tmp_path):
    for i in range(3):
        png(tmp_path / f"{i}.png", size=(60, 30))
        (tmp_path / f"{i}.txt").write_text("a, b, c, d, e, f")
    cfg = DataConfig(path=str(tmp_path), resolution=32, shuffle_tags=True, caption_dropout=0.3, trigger="sks",
                     buckets=True, bucket_step=8)
    examples = scan(cfg).examples
    ds = ImageCaptionDataset(examples, cfg, seed=1, sizes=item_sizes(examples, cfg))
    first = [ds[(e, i)].caption for e in range(4) for i in range(3)]
    assert [ImageCaptionDataset(examples, cfg, 1, item_sizes(examples, cfg))[(e, i)].caption
            for e in range(4) for i in range(3)] == first
    assert len(set(first)) > 2
    item = ds[(0, 0)]
    assert item.pixels.shape[1:] == item.target_size and item.target_size[0] < item.target_size[1]


def test_datasets_list_of_tables_is_strict(tmp_path):
    base = {"model": {"path": "m"}, "data": {"datasets": [{"path": str(tmp_path), "weight": 2.0, "repeats": 3}]}}
    config = load_config(data=base, check_paths=False)
    assert config.data.datasets[0].weight == 2.0 and config.data.datasets[0].repeats == 3
    from difftune.config.loader import config_to_dict, dump_toml, tomllib

    written = dump_toml(config_to_dict(config))  # what a run saves as config.toml
    assert load_config(data=tomllib.loads(written), check_paths=False) == config
    bad = {"model": {"path": "m"}, "data": {"datasets": [{"path": str(tmp_path), "wieght": 2.0}]}}
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.wieght: unknown key \(did you mean data\.datasets\[0\]\.weight"):
        load_config(data=bad, check_paths=False)
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.repeats: expected an integer"):
        load_config(data={"model": {"path": "m"}, "data": {"datasets": [{"path": "x", "repeats": "3"}]}},
                    check_paths=False)
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.path: .* does not exist"):
        load_config(data={"model": {"path": str(tmp_path)}, "data": {"datasets": [{"path": "./nope"}]}})


def test_subject_and_regularisation_datasets(tmp_path):
    subj, reg = tmp_path / "subj", tmp_path / "reg"
    subj.mkdir()
    reg.mkdir()
    for i in range(2):
        png(subj / f"{i}.png")
    for i in range(6):
        png(reg / f"{i}.png")
    cfg = load_config(data={"model": {"path": "m"}, "data": {
        "path": str(subj), "instance_prompt": "a photo of sks dog", "trigger": "sks",
        "datasets": [{"path": str(reg), "instance_prompt": "a photo of a dog", "weight": 1.0, "trigger": ""}]}},
        check_paths=False).data
    result = scan(cfg)
    assert [len(g) for g in result.groups()] == [2, 6]
    assert {ex.trigger for ex in result.examples if ex.dataset == 1} == {""}
    order = batch_order(result, item_sizes(result.examples, cfg), cfg, 1, 0)
    epoch = order.order(0)
    assert sum(result.examples[i].dataset == 0 for i in epoch) == 4  # equal weights: half of 8


def test_cache_text_conflicts_are_config_errors():
    with pytest.raises(ConfigError, match="data.cache_text"):
        load_config(data={"model": {"path": "m"}, "data": {"path": "d", "cache_text": True},
                          "method": {"train_text_encoder": True}}, check_paths=False)
    with pytest.raises(ConfigError, match="data.background"):
        load_config(data={"model": {"path": "m"}, "data": {"path": "d", "background": "blurple"}},
                    check_paths=False)


def test_a_word_is_taken_out_as_a_whole_word_and_the_punctuation_tidied():
    assert without_word("a red sks diamond on a grey background", "sks") == "a red diamond on a grey background"
    assert without_word("sks, a dog on grass", "sks") == "a dog on grass"
    assert without_word("a dog, sks", "sks") == "a dog"
    assert without_word("a photo of SKS dog.", "sks") == "a photo of dog."
    assert without_word("a sksy dog", "sks") is None  # not the word
    assert without_word("a dog", "sks") is None
