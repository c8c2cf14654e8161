"""SD 1.5-architecture models with random weights, built from configs written here (nothing downloaded).

Shared by ``compare.py`` and ``train_step.py``. The configs are those of Stable Diffusion 1.5's
``unet``, ``vae`` and ``text_encoder`` folders; ``unet_width`` scales the UNet's channels (0.5 gives the
half-width UNet the performance issue measures). The real CLIP BPE tokenizer cannot be had offline, so
the folder carries difftune's character-level CLIP tokenizer: prompts become more tokens, but every
prompt is padded to 77 either way, so the text encoder's cost is that of the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

UNET_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
)
VAE_SD15 = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)


def unet_config(width: float = 1.0) -> dict:
    config = dict(UNET_SD15)
    config["block_out_channels"] = tuple(int(c * width) for c in UNET_SD15["block_out_channels"])
    return config


def build_unet(width: float = 1.0, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(width))


def build_pipeline_folder(folder: Path, unet_width: float = 0.5, seed: int = 0) -> Path:
    """Write a complete SD 1.5-architecture diffusers folder (once; reused when it exists)."""
    folder = Path(folder)
    marker = folder / "model_index.json"
    if marker.is_file() and json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"] == list(
            unet_config(unet_width)["block_out_channels"]):
        return folder
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from difftune.tiny import write_char_clip_tokenizer

    write_char_clip_tokenizer(folder / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "_tokenizer_src")
    unet = build_unet(unet_width, seed)
    vae = AutoencoderKL(**VAE_SD15)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
        pad_token_id=len(tokenizer) - 1, **CLIP_L,
    ))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    for f in (folder / "_tokenizer_src").iterdir():
        f.unlink()
    (folder / "_tokenizer_src").rmdir()
    return folder


def add_lora(unet, rank: int = 4) -> None:
    """The LoRA difftune and the diffusers example train: rank 4 on the attention projections, fp32."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def count_unet_step(unet, latent: int, batch: int = 1, dtype=torch.bfloat16, modes=()):
    """Run one forward + backward of ``unet`` (as in LoRA training: inputs need no grad) under a
    ``FlopCounterMode`` and any other dispatch ``modes``; return the counter."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, 4, latent, latent)
    t = torch.randint(0, 1000, (batch,))
    text = torch.randn(batch, 77, unet.config.cross_attention_dim)
    counter = FlopCounterMode(display=False)
    with contextlib.ExitStack() as stack:
        for mode in (counter, *modes):
            stack.enter_context(mode)
        stack.enter_context(torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32))
        out = unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
        out.float().pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    return counter


def unet_step_flops(unet, latent: int, batch: int = 1, dtype=torch.bfloat16) -> int:
    """FLOPs of one forward + backward of ``unet``."""
    return count_unet_step(unet, latent, batch, dtype).get_total_flops()


def matmul_peak(dtype=torch.bfloat16, n: int = 2048, repeats: int = 5) -> float:
    """Best achieved FLOP/s of an n×n matmul in ``dtype`` on this CPU (a ceiling to compare against)."""
    import time

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best
