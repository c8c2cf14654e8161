"""Tiny, randomly initialised models built from config kwargs.

Used by ``difftune demo``, the test suite and the benchmarks. Nothing is downloaded: every
component is created from a config and saved as a real diffusers folder, so the normal loading
code reads it back exactly as it would read a model from the Hub.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TinySize:
    """Widths for a tiny SD-architecture model. ``scale`` multiplies every channel count."""

    block_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    text_hidden: int = 32
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (32, 32)
    sample_size: int = 32


def write_char_clip_tokenizer(folder: Path, model_max_length: int = 77) -> None:
    """Write a character-level CLIP tokenizer (``vocab.json`` and an empty ``merges.txt``).

    ``CLIPTokenizer`` loads it offline; every printable ASCII character is one token, so any
    English prompt tokenises without unknown tokens.
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for ch in string.printable.strip():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )


def tiny_clip_text_encoder(vocab_size: int, hidden: int, layers: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 8),
        max_position_embeddings=77,
        projection_dim=projection_dim or hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return cls(config)


def tiny_vae(channels: tuple[int, ...], sample_size: int, latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, channels[0]),
        sample_size=sample_size,
        **extra,
    )


def build_tiny_sd(
    folder: str | Path,
    *,
    size: TinySize | None = None,
    prediction_type: str = "epsilon",
    seed: int = 0,
) -> Path:
    """Create a tiny Stable Diffusion 1.x-style pipeline folder at ``folder`` and return it.

    ``prediction_type="v_prediction"`` makes an SD 2.x-style model. The folder is a complete
    diffusers pipeline (``model_index.json`` and one sub-folder per component).
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    size = size or TinySize()
    folder = Path(folder)
    torch.manual_seed(seed)
    tok_dir = folder / "_tokenizer_src"
    write_char_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    n = len(size.block_channels)
    unet = UNet2DConditionModel(
        sample_size=size.sample_size // 2 ** (len(size.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        layers_per_block=size.layers_per_block,
        block_out_channels=size.block_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=size.cross_attention_dim,
        attention_head_dim=size.attention_head_dim,
        norm_num_groups=min(32, size.block_channels[0]),
    )
    text_encoder = tiny_clip_text_encoder(len(tokenizer), size.text_hidden, size.text_layers)
    vae = tiny_vae(size.vae_channels, size.sample_size)
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return folder


def make_tiny_dataset(folder: str | Path, n: int = 4, size: int = 64, seed: int = 0, captions: bool = True) -> Path:
    """Write ``n`` simple coloured-shape PNG images (and a ``metadata.jsonl``) into ``folder``."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    shapes = ["circle", "square"]
    lines = []
    for i in range(n):
        colour = colours[i % len(colours)]
        shape = shapes[(i // len(colours) + i) % 2]
        bg = tuple(int(v) for v in rng.integers(0, 80, size=3))
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        m = size // 5
        box = (m, m, size - m, size - m)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        name = f"img_{i:03d}.png"
        img.save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": f"a {colour} {shape}"}))
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
