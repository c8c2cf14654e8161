"""One contract, every registered model family: load, encode, predict, train, sample, export, reload.

Each family's tiny model is built offline and saved as a real diffusers folder, so the family's
own loading code reads it; the exported adapter must load through that family's diffusers
pipeline with every LoRA key matched, and change its image.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial

import numpy as np
import pytest
import torch

from difftune import tiny
from difftune.config.loader import load_config
from difftune.models import FAMILIES, get_family
from difftune.models.loading import detect_family, resolve_source
from difftune.objectives import OBJECTIVES
from difftune.training.loop import train

#: A tiny builder per registered family. A new family without one fails the contract test.
BUILDERS = {
    "sd1": tiny.build_tiny_sd,
    "sd2": partial(tiny.build_tiny_sd, prediction_type="v_prediction"),
    "sdxl": tiny.build_tiny_sdxl,
    "sd3": tiny.build_tiny_sd3,
    "flux": tiny.build_tiny_flux,
}
#: SD 2.x is told apart by its 1024-wide text encoder, which a tiny model does not have.
UNDETECTABLE_WHEN_TINY = {"sd2"}


@pytest.fixture(scope="module", params=FAMILIES.names())
def family_model(request, tmp_path_factory):
    name = request.param
    assert name in BUILDERS, f"family {name!r} has no tiny builder in this contract test"
    return name, BUILDERS[name](tmp_path_factory.mktemp("models") / f"tiny-{name}")


class _Unusable(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("a text encoder was used after the prompt was encoded")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _image(pipe, prompt: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=2, height=32, width=32, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return np.asarray(out.images[0])


def _lora_module_counts(pipe, prefixes: list[str]) -> dict[str, int]:
    """Modules with an injected LoRA A matrix, per pipeline component."""
    return {p: sum(1 for n, _ in getattr(pipe, p).named_modules() if n.endswith("lora_A.default_0")
                   or n.endswith("lora_A.default")) for p in prefixes}


def test_family_contract(family_model, tmp_path, shapes_data, run_config):
    name, folder = family_model
    source = resolve_source(str(folder))
    if name not in UNDETECTABLE_WHEN_TINY:
        assert detect_family(source) == name

    # Load through the family's own code; encode, noise, predict with the family's objective.
    family = get_family(name)
    components = family.load(source, dtype=torch.float32)
    with torch.no_grad():
        cond = family.encode_prompt(components, ["a red circle", "a blue square"])
        assert cond and all(isinstance(v, torch.Tensor) and v.shape[0] == 2 for v in cond.values())
        pixels = torch.rand(2, 3, 32, 32) * 2 - 1
        latents = family.encode_images(components, pixels)
        assert family.decode_latents(components, latents).shape == pixels.shape
        objective = OBJECTIVES.get(family.objective)(family.objective_settings(components),
                                                      load_config(data=run_config(folder, shapes_data, tmp_path)).train)
        noised = objective.noise(latents.float())
        batch = {"original_sizes": [(40, 32)] * 2, "crop_top_lefts": [(4, 0)] * 2, "target_sizes": [(32, 32)] * 2}
        # Conditioning is a plain dict of tensors (cacheable): predicting needs no text encoder.
        no_text = dataclasses.replace(components, text_encoders=[_Unusable() for _ in components.text_encoders])
        pred = family.predict(no_text, components.denoiser, noised.noisy_latents, noised.timesteps, cond, batch)
    assert pred.shape == noised.target.shape

    # Two real training steps (LoRA on the denoiser and the text encoders), sampling at the end.
    out = tmp_path / "run"
    cfg = load_config(data=run_config(
        folder, shapes_data, out,
        model={"family": name},
        method={"train_text_encoder": True},
        train={"max_steps": 2, "learning_rate": 1e-2},
        validation={"prompts": ["a red circle"], "steps": 2, "guidance_scale": 1.0},
    ))
    result = train(cfg, log=lambda *_: None)
    assert all(np.isfinite(loss) for _, loss in result.losses)
    assert any(p.name == "grid.png" for p in result.samples)
    (adapter,) = result.files

    # Reload through the family's own diffusers pipeline: every saved key matched, output changed.
    from safetensors import safe_open

    with safe_open(str(adapter), "pt") as f:
        keys = list(f.keys())
    prefixes = sorted({k.split(".", 1)[0] for k in keys})
    assert prefixes == sorted([family.denoiser_name, *family.lora_encoder_names(components)])
    pipe = family.pipeline_class().from_pretrained(folder)
    before = _image(pipe, "a red circle")
    records = _Records()
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(records)
    try:
        pipe.load_lora_weights(out)
    finally:
        diffusers_logger.removeHandler(records)
    assert not [m for m in records.messages if "lora" in m.lower() or "key" in m.lower()], records.messages
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys), keys
    saved = {p: sum(1 for k in keys if k.startswith(p + ".") and k.endswith(".lora_A.weight")) for p in prefixes}
    assert _lora_module_counts(pipe, prefixes) == saved
    after = _image(pipe, "a red circle")
    assert np.abs(after - before).max() > 1e-4
