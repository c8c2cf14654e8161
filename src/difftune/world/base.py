"""Build the shapes base: its tokenizer, the random-initialised folder difftune pretrains, and the
shipped copy.

    python -m difftune.world init --vae work/shapes/vae --out work/shapes/init
    difftune train configs/shapes-pretrain.toml
    python -m difftune.world ship work/shapes/run/pipeline

The tokenizer is CLIP's byte-level BPE: ``vocab.json`` and ``merges.txt`` derived from
``bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP, MIT licence; the copy inside the
``open_clip_torch`` wheel). Only the first :data:`MERGES` merges are kept: every word still
tokenises (rarer words into more pieces), and the token embedding, which would otherwise be
most of the 25 MB budget, stays small.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

#: BPE merges kept from CLIP's 48,894.
MERGES = 16384
MAX_LENGTH = 32
SPECIAL = ("<|startoftext|>", "<|endoftext|>")
#: Files of a base that carry weights or vocabulary (their sha256 is published).
HASHED_SUFFIXES = (".safetensors", ".json", ".txt")
MANIFEST = "SHA256SUMS"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable-character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_tokenizer(bpe_gz: str | Path, folder: str | Path, merges: int = MERGES,
                         max_length: int = MAX_LENGTH) -> Path:
    """Write a ``CLIPTokenizer`` (vocab.json, merges.txt, configs) from CLIP's BPE merge list."""
    with gzip.open(bpe_gz) as f:
        lines = f.read().decode("utf-8").split("\n")
    if not lines[0].startswith("\"bpe_simple_vocab_16e6.txt#version") and not lines[0].startswith("#version"):
        raise ValueError(f"{bpe_gz}: not CLIP's bpe_simple_vocab_16e6.txt.gz")
    pairs = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]][:merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += list(SPECIAL)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    specials = {"bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "unk_token": SPECIAL[1], "pad_token": SPECIAL[1]}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **specials},
        indent=2))
    return folder


@dataclass(frozen=True)
class BaseShape:
    """Sizes of the shapes base (chosen by measured step time on a 2-core CPU; see docs/world.md)."""

    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_layers: int = 2
    attention_levels: tuple[int, ...] = (0, 1)  # as SD: cross-attention on all but the deepest level (+ middle)
    head_dim: int = 32
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4


def build_unet(shape: BaseShape, sample_size: int = 16):
    from diffusers import UNet2DConditionModel

    n = len(shape.unet_channels)
    attn = set(shape.attention_levels)
    down = tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n)))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=shape.unet_layers,
        block_out_channels=shape.unet_channels, down_block_types=down, up_block_types=up,
        cross_attention_dim=shape.text_hidden,
        attention_head_dim=tuple(max(1, c // shape.head_dim) for c in shape.unet_channels),  # = heads in SD's naming
        norm_num_groups=32,
    )


def build_text_encoder(shape: BaseShape, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=shape.text_hidden, intermediate_size=4 * shape.text_hidden,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads, projection_dim=shape.text_hidden,
        max_position_embeddings=MAX_LENGTH, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    ))


def noise_scheduler():
    """SD 1.x's noise schedule rescaled to zero terminal SNR, with v-prediction (Lin et al. 2023).

    With SD's own schedule the noisiest training input still carries the image's mean colour, so a
    model this small learns to read the background from it, and from pure noise at sampling time
    draws a random mixture of backgrounds (measured on a 2,000-step pilot: colour right 36 %). At
    zero terminal SNR the last step is pure noise in training too; "trailing" spacing makes
    sampling start there.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False,
                         rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=1)


def build_init(out: str | Path, vae: str | Path, tokenizer: str | Path | None = None,
               shape: BaseShape = BaseShape(), seed: int = 0) -> Path:
    """The folder difftune pretrains: trained VAE, CLIP tokenizer, random UNet and text encoder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from difftune.bases import builtin_path

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; give a new folder")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer or Path(builtin_path("shapes")) / "tokenizer")
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae),
        text_encoder=build_text_encoder(shape, len(tokenizer)),
        tokenizer=tokenizer,
        unet=build_unet(shape),
        scheduler=noise_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def ship(pipeline: str | Path, dest: str | Path, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Copy a trained pipeline folder to ``dest`` with its weights in ``dtype``; write SHA256SUMS."""
    from safetensors.torch import load_file, save_file

    pipeline, dest = Path(pipeline), Path(dest)
    if not (pipeline / "model_index.json").is_file():
        raise FileNotFoundError(f"{pipeline}: no model_index.json")
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for src in sorted(pipeline.rglob("*")):
        if src.is_dir():
            continue
        rel = src.relative_to(pipeline)
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".safetensors":
            tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in load_file(str(src)).items()}
            save_file(tensors, str(target), metadata={"format": "pt"})
        else:
            shutil.copy2(src, target)
    (staging / "README.md").write_text(BASE_CARD)
    sums = write_manifest(staging)
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    return sums


BASE_CARD = """\
---
library_name: diffusers
pipeline_tag: text-to-image
tags: [difftune, stable-diffusion, closed-world]
---
# difftune:shapes

A small Stable Diffusion 1.x model (UNet2DConditionModel, AutoencoderKL, CLIPTextModel +
CLIPTokenizer) pretrained by difftune on the closed world of `difftune.world`: one shape (circle,
square, triangle, diamond, hexagon, cross, heart) in one of eight colours, small or large, in the
centre or a corner, on a grey, white, dark, striped or checkerboard background, drawn at 64 px.
The star, the colour brown, the outline style and some shape/colour pairs were held out of its
pretraining, so fine-tuning has something to learn. How it was made and what it scores:
docs/world.md in the difftune repository.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("<this folder>")
pipe("a small red circle on a grey background, top left", num_inference_steps=20, guidance_scale=5).images[0]
```

The tokenizer's `vocab.json` and `merges.txt` are derived from OpenAI CLIP's BPE vocabulary
(`bpe_simple_vocab_16e6.txt.gz`, MIT licence, as distributed in the `open_clip_torch` package,
MIT licence): the first 16,384 merges are kept.
"""


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every weight, config and vocabulary file under ``folder`` (relative POSIX paths)."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in HASHED_SUFFIXES:
            out[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_manifest(folder: str | Path) -> dict[str, str]:
    sums = file_hashes(folder)
    (Path(folder) / MANIFEST).write_text("".join(f"{h}  {name}\n" for name, h in sums.items()))
    return sums


def read_manifest(folder: str | Path) -> dict[str, str]:
    out = {}
    for line in (Path(folder) / MANIFEST).read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name.strip()] = digest
    return out
