"""Pivotal tuning (TI + LoRA) and full fine-tuning: what they save loads in diffusers and changes the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_helpers import base_pipeline, pipeline_image
from safetensors.torch import load_file

from difftune import load_config
from difftune.errors import ConfigError

PIVOTAL = {"type": "pivotal", "token": "<sks>", "initializer_token": "dog", "text_learning_rate": 5e-2,
           "embedding_stop_step": 1}


def test_pivotal_saves_both_parts_and_embeddings_stop_training(train_run, tiny_sd):
    result = train_run(method=PIVOTAL, train={"max_steps": 3, "checkpoint_every": 1, "checkpoints_keep": 0})
    out = result.output_dir
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    embeds = load_file(out / "learned_embeds.safetensors")["<sks>"]
    at_1 = load_file(out / "checkpoints" / "step-1" / "trainable.safetensors")
    at_2 = load_file(out / "checkpoints" / "step-2" / "trainable.safetensors")
    # The embedding stopped at step 1; the LoRA kept training.
    assert torch.equal(at_1["embeddings.text_encoder"].float(), embeds)
    lora_keys = [k for k in at_1 if k.startswith("denoiser.")]
    assert any(not torch.equal(at_1[k], at_2[k]) for k in lora_keys)

    pipe = base_pipeline(tiny_sd)
    before = pipeline_image(pipe, "a photo of <sks>")
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion(out, token="<sks>")
    assert any(k.startswith("unet.") for k in lora)
    assert not np.allclose(before, pipeline_image(pipe, "a photo of <sks>"))
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "load_textual_inversion" in card


def test_pivotal_param_groups_have_separate_learning_rates(tiny_sd, run_config, shapes_data, tmp_path):
    from difftune.methods import METHODS
    from difftune.models import detect_family, get_family
    from difftune.models.loading import resolve_source

    config = load_config(data=run_config(tiny_sd, shapes_data, tmp_path, method=PIVOTAL))
    source = resolve_source(str(tiny_sd), None, None, None)
    family = get_family(detect_family(source, "auto"))
    components = family.load(source, dtype=torch.float32)
    method = METHODS.get("pivotal").build(config.method, family)
    method.prepare(components)
    lora_group, text_group = method.param_groups(components, 1e-4)
    assert lora_group["lr"] == 1e-4 and text_group["lr"] == 5e-2
    assert text_group["params"] == [components.text_encoders[0].get_input_embeddings().weight]
    assert all("lora" in n for n, p in components.denoiser.named_parameters()
               if any(p is q for q in lora_group["params"]))


def test_full_fine_tune_exports_a_loadable_pipeline_with_ema(train_run, tiny_sd):
    from diffusers import StableDiffusionPipeline

    plain = train_run("plain", method={"type": "full"}, train={"max_steps": 2, "learning_rate": 1e-3})
    ema = train_run("ema", method={"type": "full", "ema": True, "ema_decay": 0.9}, train={"max_steps": 2})
    base = base_pipeline(tiny_sd)
    before = pipeline_image(base)
    tuned = StableDiffusionPipeline.from_pretrained(plain.output_dir / "pipeline")
    assert not np.allclose(before, pipeline_image(tuned))
    base_w = base.unet.conv_in.weight
    plain_w = tuned.unet.conv_in.weight
    ema_w = StableDiffusionPipeline.from_pretrained(ema.output_dir / "pipeline").unet.conv_in.weight
    assert not torch.equal(plain_w, base_w)
    # The EMA export lies between the base and the trained weights, not at either.
    assert not torch.equal(ema_w, plain_w) and not torch.equal(ema_w, base_w)
    assert (ema_w - base_w).abs().sum() < (plain_w - base_w).abs().sum()
    assert "pipeline" in (plain.output_dir / "README.md").read_text()
    assert f"done: 2 steps; pipeline in {plain.output_dir}" in plain.messages  # not "adapter"


def test_full_fine_tune_with_both_caches_exports_the_vae_and_text_encoder(train_run, tiny_sd):
    """With latents and text cached the frozen encoders leave training, but the pipeline folder needs them."""
    from diffusers import StableDiffusionPipeline

    result = train_run(method={"type": "full"}, train={"max_steps": 1, "learning_rate": 1e-3},
                       data={"cache_latents": True, "cache_text": True})
    tuned = StableDiffusionPipeline.from_pretrained(result.output_dir / "pipeline")
    assert tuned.vae is not None and tuned.text_encoder is not None
    pipeline_image(tuned)  # it draws


def _full_method(tiny_sd, run_config, shapes_data, tmp_path, family_cls, **method):
    from difftune.methods import METHODS
    from difftune.models.loading import resolve_source

    config = load_config(data=run_config(tiny_sd, shapes_data, tmp_path,
                                         method={"type": "full", "save_single_file": True, **method}))
    source = resolve_source(str(tiny_sd), None, None, None)
    family = family_cls()
    return METHODS.get("full").build(config.method, family), family.load(source, dtype=torch.float32)


def test_single_file_needs_a_family_converter(tiny_sd, run_config, shapes_data, tmp_path):
    from difftune.models.sd import StableDiffusion

    class NoConverter(StableDiffusion):
        writes_single_file = False

    method, components = _full_method(tiny_sd, run_config, shapes_data, tmp_path, NoConverter)
    with pytest.raises(ConfigError, match="method.save_single_file: .* has no converter"):
        method.prepare(components)


def test_single_file_is_written_by_the_family_from_the_exported_weights(tiny_sd, run_config, shapes_data, tmp_path):
    from difftune.models.sd import StableDiffusion

    calls = []

    class Recording(StableDiffusion):
        def save_single_file(self, components, path, denoiser=None, text_encoders=None, *, dtype=None,
                             metadata=None):
            calls.append((denoiser, text_encoders, metadata))
            path.write_bytes(b"x")
            return path

    method, components = _full_method(tiny_sd, run_config, shapes_data, tmp_path, Recording)
    method.prepare(components)
    files = method.export(components, tmp_path, {"difftune.method": "full"})
    assert tmp_path / "model.safetensors" in files and len(calls) == 1
    denoiser, encoders, metadata = calls[0]
    assert denoiser is components.denoiser  # the weights in place (a run swaps the EMA in before export)
    assert metadata == {"difftune.method": "full"}
    assert "from_single_file" in method.card_details()["usage"]


def test_full_single_file_loads_in_diffusers(train_run, tiny_sd):
    """With the family's original-layout converter, the single file loads with from_single_file."""
    pytest.importorskip("difftune.models.sd_single_file", reason="needs the SD single-file converter")
    from diffusers import StableDiffusionPipeline

    result = train_run(method={"type": "full", "save_single_file": True}, train={"max_steps": 1})
    single = StableDiffusionPipeline.from_single_file(result.output_dir / "model.safetensors", config=str(tiny_sd),
                                                      safety_checker=None, requires_safety_checker=False)
    folder = StableDiffusionPipeline.from_pretrained(result.output_dir / "pipeline")
    torch.testing.assert_close(single.unet.conv_in.weight, folder.unet.conv_in.weight)
    base = base_pipeline(tiny_sd)
    assert not torch.equal(single.unet.conv_in.weight, base.unet.conv_in.weight)
