"""Family-specific conditioning that the contract test cannot see: SDXL time ids, Flux guidance."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from difftune import load_config
from difftune.data.batch import Batch
from difftune.models import get_family
from difftune.models.loading import resolve_source


def _family(name, tmp_path, **train):
    cfg = load_config(data={"model": {"path": "m"}, "data": {"path": "d"}, "train": train}, check_paths=False)
    return get_family(name, cfg.model, cfg.train)


def _predict(family, components, batch=None):
    torch.manual_seed(0)
    with torch.no_grad():
        cond = family.encode_prompt(components, ["a red circle"])
        latents = torch.randn_like(family.encode_images(components, torch.zeros(1, 3, 32, 32)))
        t = torch.tensor([500.0])
        return family.predict(components, components.denoiser, latents, t, cond, batch or Batch())


def test_sdxl_time_ids_come_from_each_sample(tmp_path):
    from difftune.tiny import build_tiny_sdxl

    family = _family("sdxl", tmp_path)
    components = family.load(resolve_source(str(build_tiny_sdxl(tmp_path / "xl"))), dtype=torch.float32)
    batch = Batch(captions=["a red circle"], original_sizes=[(600, 400)], crop_top_lefts=[(10, 20)],
                  target_sizes=[(32, 32)])
    ids = family.time_ids(components, batch, torch.zeros(1, 4, 16, 16))
    assert ids.tolist() == [[600, 400, 10, 20, 32, 32]]
    # Without a per-sample record: the uncropped latent size in pixels.
    assert family.time_ids(components, Batch(), torch.zeros(1, 4, 16, 16)).tolist() == [[32, 32, 0, 0, 32, 32]]
    # The UNet sees them: a different crop changes the prediction.
    other = dataclasses.replace(batch, crop_top_lefts=[(0, 0)])
    assert not torch.allclose(_predict(family, components, batch), _predict(family, components, other))


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux_guidance_embedding(tmp_path, guidance):
    from difftune.tiny import build_tiny_flux

    folder = build_tiny_flux(tmp_path / "flux", guidance=guidance)
    low = _family("flux", tmp_path, guidance_scale=1.0)
    high = _family("flux", tmp_path, guidance_scale=4.0)
    components = low.load(resolve_source(str(folder)), dtype=torch.float32)
    a, b = _predict(low, components), _predict(high, components)
    assert a.shape == (1, 16, 16, 16)  # unpacked back to the latent grid
    # dev: train.guidance_scale reaches the guidance embedding; schnell has none to reach.
    assert torch.allclose(a, b) is not guidance
