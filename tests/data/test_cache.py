"""Latent and text caches: hits and misses follow the key; NaN latents are reported by name."""

from __future__ import annotations

import pytest
import torch

from difftune import load_config
from difftune.data.pipeline import build_training_data, release_if_cached
from difftune.models import detect_family, get_family
from difftune.models.loading import resolve_source

from .helpers import png


@pytest.fixture(scope="module")
def loaded(tiny_sd):
    source = resolve_source(str(tiny_sd))
    family = get_family(detect_family(source))
    return family, family.load(source, dtype=torch.float32)


def _config(tiny_sd, data, tmp_path, **extra):
    values = {"path": str(data), "resolution": 32, "cache_latents": True, "cache_text": True,
              "cache_dir": str(tmp_path / "cache"), **extra}
    return load_config(data={"model": {"path": str(tiny_sd)}, "data": values,
                             "output": {"dir": str(tmp_path / "out")}})


def _folder(tmp_path, n=3):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    for i in range(n):
        png(d / f"{i}.png", size=(48, 40), colour=(60 * i, 20, 90))
        (d / f"{i}.txt").write_text(f"caption {i}")
    return d


def test_cache_hits_and_misses_follow_the_key(tiny_sd, loaded, tmp_path):
    family, components = loaded
    data = _folder(tmp_path)
    run = build_training_data(_config(tiny_sd, data, tmp_path, random_flip=True), family, components, log=print)
    assert (run.latent_stats.misses, run.latent_stats.hits) == (6, 0)  # plain + flipped
    assert (run.text_stats.misses, run.text_stats.hits) == (3, 0)
    item = run.dataset[(0, 0)]
    assert item.pixels is None and item.latent_mean.shape == (4, 16, 16)
    assert set(item.conditioning) == {"encoder_hidden_states"}

    again = build_training_data(_config(tiny_sd, data, tmp_path, random_flip=True), family, components)
    assert (again.latent_stats.misses, again.latent_stats.hits) == (0, 6)
    assert again.text_stats.misses == 0

    png(data / "1.png", size=(48, 40), colour=(255, 255, 0))  # new bytes for one image
    (data / "2.txt").write_text("a new caption")
    changed = build_training_data(_config(tiny_sd, data, tmp_path, random_flip=True), family, components)
    assert (changed.latent_stats.misses, changed.latent_stats.hits) == (2, 4)
    assert (changed.text_stats.misses, changed.text_stats.hits) == (1, 2)

    resized = build_training_data(_config(tiny_sd, data, tmp_path, resolution=16), family, components)
    assert (resized.latent_stats.misses, resized.latent_stats.hits) == (3, 0)
    assert resized.text_stats.hits == 3  # text does not depend on the image size


def test_cached_latents_match_the_vae(tiny_sd, loaded, tmp_path):
    family, components = loaded
    run = build_training_data(_config(tiny_sd, _folder(tmp_path, 1), tmp_path), family, components)
    item = run.dataset[(0, 0)]
    import random

    from difftune.data.transforms import prepare_image
    pixels = prepare_image(run.scan.examples[0].image, (32, 32), center_crop=True, rng=random.Random(0)).pixels
    dist = components.vae.encode(pixels[None]).latent_dist
    scale = components.vae.config.scaling_factor
    torch.testing.assert_close(item.latent_mean, dist.mean[0] * scale)
    torch.testing.assert_close(item.latent_std, dist.std[0] * scale)


def test_nan_latents_are_reported_with_the_file_name(tiny_sd, loaded, tmp_path, monkeypatch):
    family, components = loaded
    data = _folder(tmp_path)
    real = type(family).latent_distribution

    def poisoned(self, comps, pixels):
        mean, std = real(self, comps, pixels)
        bad = pixels[:, 0].flatten(1).mean(1) < -0.99  # image 0 has red channel 0; encoded in a batch
        mean = torch.where(bad[:, None, None, None], float("nan"), mean)
        return mean, std

    monkeypatch.setattr(type(family), "latent_distribution", poisoned)
    lines = []
    run = build_training_data(_config(tiny_sd, data, tmp_path), family, components, log=lines.append)
    assert [ex.name for ex in run.scan.examples] == ["1.png", "2.png"]
    assert any("0.png: non-finite latents" in line for line in lines)
    assert "1 non-finite latents" in run.card_entry()


def test_release_frees_the_encoders(tiny_sd, tmp_path):
    source = resolve_source(str(tiny_sd))
    family = get_family(detect_family(source))
    components = family.load(source, dtype=torch.float32)
    config = _config(tiny_sd, _folder(tmp_path, 1), tmp_path)
    assert release_if_cached(config, components)
    assert components.vae is None and components.text_encoders == [None]
