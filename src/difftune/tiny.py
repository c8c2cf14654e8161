"""Tiny, randomly initialised models built from config kwargs.

Used by the test suite and the benchmarks (the demo uses the embedded base, difftune.bases). Nothing is downloaded: every
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


# --- SDXL, SD3 and Flux ------------------------------------------------------------------------
#
# Each builder writes a complete diffusers folder of the real architecture at toy widths, so the
# families' own loading code reads it. Widths are chosen to satisfy each architecture's wiring
# (e.g. SD3 pads the concatenated CLIP features up to the T5 width, Flux's rope axes sum to the
# head width), not to be useful models.


def write_tiny_t5_tokenizer(folder: Path, model_max_length: int = 32) -> None:
    """Write a character-level T5 tokenizer (a ``tokenizer.json`` Unigram model) into ``folder``.

    Built with the ``tokenizers`` library, so nothing is downloaded; ``T5TokenizerFast`` loads it.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        vocab += [(ch, -3.0), ("\u2581" + ch, -3.5)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    raw = folder / "_raw_tokenizer.json"
    tok.save(str(raw))
    fast = T5TokenizerFast(tokenizer_file=str(raw), extra_ids=0, model_max_length=model_max_length,
                           pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    raw.unlink()
    fast.save_pretrained(folder)


def tiny_t5_encoder(vocab_size: int, d_model: int, layers: int = 1):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=d_model * 2, num_layers=layers,
        num_heads=max(1, d_model // 8), relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))


def _tiny_tokenizers(folder: Path, t5: bool):
    """A character-level CLIP tokenizer and, if ``t5``, a T5 one; built in scratch folders."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    scratch = folder / "_tokenizer_src"
    write_char_clip_tokenizer(scratch / "clip")
    clip = CLIPTokenizer.from_pretrained(scratch / "clip")
    t5_tok = None
    if t5:
        write_tiny_t5_tokenizer(scratch / "t5")
        t5_tok = T5TokenizerFast.from_pretrained(scratch / "t5")
    return clip, t5_tok, scratch


def _save(pipe, folder: Path, scratch: Path) -> Path:
    import shutil

    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(scratch)
    return folder


def build_tiny_sdxl(folder: str | Path, *, seed: int = 0) -> Path:
    """A tiny SDXL-architecture folder: UNet with ``text_time`` conditioning, CLIP-L and CLIP-G (with projection)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tok, _, scratch = _tiny_tokenizers(folder, t5=False)
    hidden = 32
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=2 * hidden,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + hidden, norm_num_groups=32,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae((32, 32), 32, scaling_factor=0.13025, force_upcast=True),
        text_encoder=tiny_clip_text_encoder(len(tok), hidden, 1),
        text_encoder_2=tiny_clip_text_encoder(len(tok), hidden, 1, projection_dim=hidden),
        tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
    )
    return _save(pipe, folder, scratch)


def build_tiny_sd3(folder: str | Path, *, seed: int = 0, num_layers: int = 2) -> Path:
    """A tiny SD3-architecture folder: MMDiT, CLIP-L + CLIP-G (with projection) + T5, a 16-channel VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    torch.manual_seed(seed)
    tok, t5_tok, scratch = _tiny_tokenizers(folder, t5=True)
    hidden = 32
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=2 * hidden, caption_projection_dim=16,
        pooled_projection_dim=2 * hidden, pos_embed_max_size=32,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae((32, 32), 32, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                     use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=tiny_clip_text_encoder(len(tok), hidden, 1, projection_dim=hidden),
        text_encoder_2=tiny_clip_text_encoder(len(tok), hidden, 1, projection_dim=hidden),
        text_encoder_3=tiny_t5_encoder(len(t5_tok), 2 * hidden),
        tokenizer=tok, tokenizer_2=tok, tokenizer_3=t5_tok,
    )
    return _save(pipe, folder, scratch)


def build_tiny_flux(folder: str | Path, *, guidance: bool = True, seed: int = 0) -> Path:
    """A tiny Flux-architecture folder; ``guidance=True`` is dev-like (guidance embedding), False schnell-like."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tok, t5_tok, scratch = _tiny_tokenizers(folder, t5=True)
    hidden = 32
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=hidden, pooled_projection_dim=hidden,
        guidance_embeds=guidance, axes_dims_rope=(4, 4, 8),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=tiny_vae((32, 32), 32, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                     use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=tiny_clip_text_encoder(len(tok), hidden, 1),
        tokenizer=tok,
        text_encoder_2=tiny_t5_encoder(len(t5_tok), hidden),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    return _save(pipe, folder, scratch)
