"""Block offloading of the frozen denoiser (``model.offload = "blocks"``).

This machine has no GPU, so the hooks are tested with a stand-in for "on the device": an offloaded
weight is an empty tensor, so any use of a weight that is not loaded fails. Training-step gradients
must equal those of the model without offloading, and every block must end the step offloaded.
"""

from __future__ import annotations

import pytest
import torch

from difftune import load_config, tiny
from difftune.errors import ConfigError, DifftuneError
from difftune.methods import METHODS
from difftune.models import get_family
from difftune.models.loading import resolve_source
from difftune.models.offload import offload_blocks


@pytest.mark.parametrize(("name", "builder", "channels"), [("flux", tiny.build_tiny_flux, 16),
                                                            ("sd1", tiny.build_tiny_sd, 4)])
def test_offloaded_blocks_give_the_same_lora_gradients_and_end_offloaded(name, builder, channels, tmp_path):
    folder = builder(tmp_path / name)
    grads, loads = [], []
    for offload in (False, True):
        config = load_config(data={"model": {"path": str(folder)}, "data": {"path": str(tmp_path)}})
        family = get_family(name, config.model)
        components = family.load(resolve_source(str(folder)), dtype=torch.float32)
        torch.manual_seed(0)
        METHODS.get("lora").build(config.method, family).prepare(components)
        with torch.no_grad():
            for n, p in components.denoiser.named_parameters():
                if "lora_B" in n:  # B ≠ 0: every LoRA matrix gets a gradient
                    p.normal_(0, 0.1)
            cond = family.encode_prompt(components, ["a red circle"])
        components.denoiser.enable_gradient_checkpointing()
        hooks = []
        if offload:
            hooks = offload_blocks(components.denoiser, torch.device("cpu"), checkpointed=True,
                                   to_device=lambda t: (loads.append(1), t.clone())[1],
                                   placeholder=lambda t: torch.empty(0, dtype=t.dtype))
            assert len(hooks) > 1 and not any(h.loaded for h in hooks)
        latents = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(1))
        batch = {"original_sizes": [(32, 32)], "crop_top_lefts": [(0, 0)], "target_sizes": [(32, 32)]}
        components.denoiser.train()
        pred = family.predict(components, components.denoiser, latents, torch.tensor([500.0]), cond, batch)
        pred.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in components.denoiser.named_parameters() if p.grad is not None})
        assert not any(h.loaded for h in hooks)  # nothing left on the "device" after the step
        with torch.no_grad():  # sampling: loaded and dropped block by block too
            family.predict(components, components.denoiser, latents, torch.tensor([500.0]), cond, batch)
        assert not any(h.loaded for h in hooks)
    assert loads  # weights really were brought in
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key, value in grads[0].items():
        torch.testing.assert_close(grads[1][key], value, rtol=1e-4, atol=1e-7)


def test_offload_is_refused_without_a_gpu_or_without_checkpointing(tiny_sd, shapes_data, tmp_path, run_config,
                                                                   monkeypatch):
    from difftune.training.loop import train

    with pytest.raises(ConfigError, match="model.offload.*gradient_checkpointing"):
        load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "a", model={"offload": "blocks"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "b", model={"offload": "blocks"},
                                         train={"gradient_checkpointing": True}))
    with pytest.raises(DifftuneError, match=r'model.offload = "blocks".*CUDA GPU'):
        train(config, log=lambda *_: None)
