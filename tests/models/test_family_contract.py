"""One contract, every registered model family: load, encode, predict, train, sample, export, reload.

Each family's tiny model is built offline and saved as a real diffusers folder, so the family's
own loading code reads it; the exported adapter must load through that family's diffusers
pipeline with every LoRA key matched, and change its image.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from functools import partial

import numpy as np
import pytest
import torch

from difftune import load_config, tiny
from difftune.data.batch import Batch
from difftune.models import FAMILIES, detect_family, get_family
from difftune.models.loading import resolve_source
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
        batch = Batch(captions=["a red circle", "a blue square"], original_sizes=[(40, 32)] * 2,
                      crop_top_lefts=[(4, 0)] * 2, target_sizes=[(32, 32)] * 2)
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
    adapter, tool_file = result.files
    assert adapter.name == "pytorch_lora_weights.safetensors"
    assert tool_file.name == f"lora_for_{'_'.join(family.lora_tools)}.safetensors"
    _check_tool_file(name, tool_file, adapter, family.pipeline_class().from_pretrained(folder))

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


def _check_tool_file(name: str, tool_file, adapter_file, pipe) -> None:
    """The run's file for ComfyUI / Forge: every key recognised under their rules, each update diffusers'.

    UNet families are checked module by module; transformer families through the original model's
    weight names (recorded from diffusers' own original-to-diffusers converter), where each patch is
    added to its original weight and the checkpoint converted back must give the diffusers deltas.
    """
    from safetensors.torch import load_file

    from difftune.adapters.convert import read_adapter
    from tool_rules import comfy_apply, comfy_clip_keys, comfy_delta, comfy_transformer_keys, comfy_unet_keys

    tensors = load_file(tool_file)
    trained = read_adapter(adapter_file)
    encoders = {r: getattr(pipe, r) for r in ("text_encoder", "text_encoder_2", "text_encoder_3") if hasattr(pipe, r)}
    clip_keys = comfy_clip_keys(name, encoders)
    if hasattr(pipe, "unet"):
        patches, not_loaded = comfy_apply(tensors, {**comfy_unet_keys(pipe.unet), **clip_keys})
        assert not_loaded == []
        assert set(patches) == set(trained.modules)
        for module, m in trained.modules.items():
            assert torch.allclose(comfy_delta(patches[module]), m.delta().flatten(1), atol=1e-6), module
        return
    from diffusers.loaders import single_file_utils as sfu

    layer_keys = [k.removeprefix("lora_unet_") for k in tensors if k.startswith("lora_unet_")]
    # what the converter looks for: block indices (joint_blocks.N...), attn2, guidance
    layers = {re.sub(r"^(joint_blocks|double_blocks|single_blocks)_(\d+)_", r"\1.\2.", k) for k in layer_keys}
    patches, not_loaded = comfy_apply(tensors, {**comfy_transformer_keys(name, sorted(layers)), **clip_keys})
    assert not_loaded == []
    original = {k + ".weight": comfy_delta(p).float() for k, p in patches.items() if not k.startswith("text_encoder")}
    converter = {"sd3": sfu.convert_sd3_transformer_checkpoint_to_diffusers,
                 "flux": sfu.convert_flux_transformer_checkpoint_to_diffusers}[name]
    if name == "flux":  # diffusers' converter splits linear1 at Flux.1's full width; checked there elsewhere
        return
    converted = converter(_ZerosForMissing(original))
    for module, m in trained.modules.items():
        role, path = module.split(".", 1)
        got = patches[module] if role != "transformer" else None
        want = m.delta().flatten(1)
        if got is not None:
            assert torch.allclose(comfy_delta(got), want, atol=1e-6), module
        else:
            assert torch.allclose(converted[path + ".weight"].double().flatten(1), want, atol=1e-6), module


class _ZerosForMissing(dict):
    """An original checkpoint holding only the LoRA patches; every other weight reads as zeros."""

    def pop(self, key, *default):
        return super().pop(key) if key in self else torch.zeros(6)

    def __getitem__(self, key):
        return super().__getitem__(key) if key in self else torch.zeros(6)


@pytest.mark.parametrize("name", FAMILIES.names())
def test_declared_single_file_support_matches_the_implementation(name):
    """``writes_single_file`` (what full fine-tuning checks) is true exactly when the family has a converter."""
    from difftune.models.base import ModelFamily

    family = FAMILIES.get(name)
    has_converter = family.save_single_file is not ModelFamily.save_single_file
    assert family.writes_single_file == has_converter
    assert family.writes_single_file == (name in ("sd1", "sd2"))
