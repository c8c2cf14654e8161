"""Several resolutions in one run: every image at each, bucketed and cached at each; the held-out split unchanged."""

from __future__ import annotations

import pytest

from difftune import load_config
from difftune.errors import ConfigError
from difftune.tiny import make_tiny_dataset
from difftune.training.setup import setup
from difftune.training.step import train_step


def test_every_image_trains_at_every_resolution_cached_and_held_out_alike(tmp_path, tiny_sd, run_config):
    data = make_tiny_dataset(tmp_path / "data", n=5, size=64)

    def run_at(resolution, out):
        raw = run_config(tiny_sd, data, tmp_path / out,
                         data={"resolution": resolution, "cache_latents": True, "cache_dir": str(tmp_path / "cache")},
                         train={"batch_size": 2, "max_steps": 2}, validation={"holdout": 0.2})
        return setup(load_config(data=raw), log=lambda _m: None)

    single = run_at(32, "single")
    run = run_at([32, 48], "multi")
    dataset = run.data.dataset
    names = [ex.name for ex in run.data.scan.examples]
    assert len(names) == 8 and sorted(set(names)) == sorted(ex.name for ex in single.data.scan.examples)
    by_size = {}
    for ex, size in zip(run.data.scan.examples, dataset.sizes, strict=True):
        by_size.setdefault(size, []).append(ex.name)
    assert {s: sorted(n) for s, n in by_size.items()} == {(32, 32): sorted(set(names)), (48, 48): sorted(set(names))}
    # Cached at each resolution: every (image, size) has its latent; nothing was cached twice.
    assert run.data.latent_stats.misses == 4 and run.data.latent_stats.hits == 4  # the 32 px ones from `single`
    # Batches hold one size; an epoch covers every (image, resolution) once.
    batches = run.data.order.epoch_batches(0)
    assert all(len({dataset.sizes[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(8))
    # The held-out split is the same images; they are evaluated at each resolution.
    assert [ex.name for ex in run.data.held_out] == [ex.name for ex in single.data.held_out]
    assert sorted(run.held_out.dataset.sizes) == [(32, 32), (48, 48)]
    for _ in range(2):
        assert not train_step(run).bad


def test_resolution_lists_are_checked(tmp_path, tiny_sd, shapes_data, run_config):
    for bad in ([], [32, 32], [32, 4]):
        with pytest.raises(ConfigError, match="data.resolution: .* must be one size or a list of different sizes"):
            load_config(data=run_config(tiny_sd, shapes_data, tmp_path, data={"resolution": bad}))
