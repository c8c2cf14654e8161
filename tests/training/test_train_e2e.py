"""End-to-end training runs on a tiny SD model: what a user sees in the output folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from difftune import load_config
from difftune.training.loop import train

pytestmark = pytest.mark.slow

# Attention, feed-forward and ResNet convolutions: enough capacity to overfit four images quickly.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_sd):
    """One complete 100-step run overfitting four images, with validation and TensorBoard."""
    from tests.conftest import tiny_run_config

    from difftune.tiny import make_tiny_dataset

    root = tmp_path_factory.mktemp("run")
    data = make_tiny_dataset(root / "data", n=4, size=64)
    cfg = load_config(data=tiny_run_config(
        tiny_sd, data, root / "out",
        method={"rank": 8, "alpha": 16.0, "targets": TARGETS},
        data={"instance_prompt": "a photo of sks shape"},
        train={"max_steps": 100, "learning_rate": 2e-3, "batch_size": 4, "lr_scheduler": "cosine",
               "warmup_steps": 5, "checkpoint_every": 25, "checkpoints_keep": 2, "log_every": 5,
               "snr_gamma": 5.0},
        validation={"prompts": ["a red circle", "a blue square"], "every": 50, "images_per_prompt": 2,
                    "steps": 3},
        logging={"report_to": "tensorboard"},
    ))
    return cfg, train(cfg)


def _fixed_loss(unet, vae, text_encoder, tokenizer, scheduler, data: Path) -> float:
    """Denoising loss on the training images at fixed timesteps and fixed noise."""
    import random

    from difftune.config.schema import DataConfig
    from difftune.data.sources import load_examples
    from difftune.data.transforms import prepare_image

    examples = load_examples(DataConfig(path=str(data), resolution=32)).examples
    pixels = torch.stack([prepare_image(e.image, (32, 32), center_crop=True, flip=False, rng=random.Random(0)).pixels
                          for e in examples])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer([e.caption for e in examples], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        cond = text_encoder(ids)[0]
        total = 0.0
        for t in (50, 250, 450, 650, 850):
            noise = torch.randn(latents.shape, generator=g)
            ts = torch.full((latents.shape[0],), t)
            pred = unet(scheduler.add_noise(latents, noise, ts), ts, encoder_hidden_states=cond).sample
            total += torch.mean((pred - noise) ** 2).item()
    return total / 5


def test_loss_goes_down_when_overfitting(finished_run, tiny_sd):
    """The logged training loss falls, and so does the loss at fixed timesteps and noise."""
    from diffusers import StableDiffusionPipeline

    cfg, result = finished_run
    losses = [loss for _, loss in result.losses]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    parts = (pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, Path(cfg.data.path))
    before = _fixed_loss(pipe.unet, *parts)
    pipe.load_lora_weights(cfg.output.dir)
    after = _fixed_loss(pipe.unet, *parts)
    assert after < 0.7 * before, f"fixed-noise loss did not drop clearly: {before:.4f} -> {after:.4f}"


def test_adapter_loads_in_diffusers_with_every_key_and_changes_the_image(finished_run, tiny_sd, caplog):
    from diffusers import StableDiffusionPipeline

    cfg, result = finished_run
    out = Path(cfg.output.dir)
    adapter = out / "pytorch_lora_weights.safetensors"
    assert adapter.is_file()

    def render(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=3, height=32, width=32, generator=g, output_type="np").images

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = render(pipe)
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(out)
    assert not [r for r in caplog.records if "lora" in r.getMessage().lower() and "not" in r.getMessage()]
    with safe_open(adapter, "pt") as f:
        saved = set(f.keys())
        header = f.metadata()
    injected = {n.removesuffix(".lora_A.default_0") for n, _ in pipe.unet.named_modules()
                if n.endswith(".lora_A.default_0")}
    # Every saved A matrix landed on a LoRA layer, and every layer got a saved matrix.
    saved_a = {k.removeprefix("unet.").removesuffix(".lora_A.weight") for k in saved if k.endswith(".lora_A.weight")}
    assert len(saved_a) > 10
    assert injected == saved_a
    meta = json.loads(header["lora_adapter_metadata"])
    assert meta["unet.r"] == 8 and meta["unet.lora_alpha"] == 16.0
    assert pipe.unet.peft_config["default_0"].lora_alpha == 16.0
    after = render(pipe)
    assert np.abs(after - before).max() > 1e-3


def test_run_folder_contents(finished_run, tiny_sd):
    cfg, result = finished_run
    out = Path(cfg.output.dir)
    # Checkpoints at 25, 50, 75 and the final step 100; only the newest two are kept.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-100", "step-75"]
    for step in (50, 100):
        folder = out / "samples" / f"step-{step}"
        assert sorted(p.name for p in folder.iterdir()) == [
            "00-seed0.png", "00-seed1.png", "01-seed0.png", "01-seed1.png", "grid.png"]
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    resolved = load_config(out / "config.toml")
    assert resolved == cfg


def test_tensorboard_has_loss_lr_and_images(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _ = finished_run
    logdir = next((Path(cfg.output.dir) / "logs").rglob("events.out.tfevents.*")).parent
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr"} <= set(tags["scalars"])
    assert any(t.startswith("validation") for t in tags["images"])
    assert [e.step for e in acc.Scalars("train/loss")][-1] == 100


def test_model_card(finished_run, tiny_sd):
    from huggingface_hub import ModelCard

    cfg, _ = finished_run
    card = ModelCard.load(Path(cfg.output.dir) / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == str(tiny_sd)
    assert {"lora", "diffusers", "text-to-image"} <= set(data["tags"])
    assert data["instance_prompt"] == "a photo of sks shape"
    assert data["license"] == "openrail++"
    text = card.text
    for fact in ("8 / 16.0", ", ".join(TARGETS), "| Steps | 100 |", "0.002 (cosine, 5 warm-up steps)",
                 "4 images", "samples/step-100/00-seed0.png", "load_lora_weights", "a photo of sks shape"):
        assert fact in text, fact
