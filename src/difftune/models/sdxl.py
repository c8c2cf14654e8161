"""Stable Diffusion XL: UNet + CLIP-L and OpenCLIP-G (pooled) text encoders + VAE, DDPM objective.

The UNet is also conditioned on ``add_time_ids`` — each image's original size, crop offset and
target size — which the data stage records per sample. SDXL's own VAE overflows in fp16, so it is
kept in fp32 unless ``model.vae`` names a replacement (e.g. an fp16-safe VAE).
"""

from __future__ import annotations

import torch
from torch import nn

from difftune.data.batch import Batch
from difftune.models.base import Components, ModelFamily, ModelSource
from difftune.models.components import (
    ModelParts,
    clip_features,
    load_components,
)


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    title = "Stable Diffusion XL"
    objective = "ddpm"
    denoiser_name = "unet"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    card_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")
    pipeline_class_names = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    single_file_types = ("xl_base",)
    tool_metadata = {"ss_base_model_version": "sdxl_base_v1-0"}
    tool_embedding_keys = ("clip_l", "clip_g")
    embedding_save_keys = ("clip_l", "clip_g")  # learned_embeds.safetensors, as difftune generate and diffusers read it
    pipeline_kwargs = {"add_watermarker": False}

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def load(self, source: ModelSource, *, dtype: torch.dtype, which: str = "all") -> Components:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        # The SDXL VAE overflows in fp16: its own VAE stays in fp32 (a model.vae replacement does not).
        parts = ModelParts(UNet2DConditionModel, DDPMScheduler,
                           ((CLIPTextModel, CLIPTokenizer), (CLIPTextModelWithProjection, CLIPTokenizer)),
                           vae_dtype=torch.float32)
        return load_components(self, parts, source, dtype, which)

    def encode_prompt(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
            states, pooled = clip_features(tokenizer, encoder, captions)
            hidden.append(states)
        # Pooled: the projected embedding of the second (OpenCLIP-G) encoder.
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def time_ids(self, components: Components, batch: Batch, latents: torch.Tensor) -> torch.Tensor:
        """``add_time_ids`` per sample: original (h, w), crop (top, left), target (h, w)."""
        n = latents.shape[0]
        if batch.original_sizes:
            rows = [(*o, *c, *t) for o, c, t in zip(batch.original_sizes, batch.crop_top_lefts, batch.target_sizes,
                                                     strict=True)]
        else:  # no per-sample record (e.g. a bare latent batch): uncropped images of the latent's size
            scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
            h, w = latents.shape[-2] * scale, latents.shape[-1] * scale
            rows = [(h, w, 0, 0, h, w)] * n
        return torch.tensor(rows, dtype=torch.float32, device=latents.device)

    def predict(self, components, denoiser: nn.Module, noisy_latents, timesteps, conditioning, batch):
        added = {
            "text_embeds": conditioning["text_embeds"],
            "time_ids": self.time_ids(components, batch, noisy_latents).to(conditioning["text_embeds"].dtype),
        }
        return denoiser(
            noisy_latents, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"],
            added_cond_kwargs=added, return_dict=False,
        )[0]
