"""Stable Diffusion XL: UNet + CLIP-L and OpenCLIP-G (pooled) text encoders + VAE, DDPM objective.

The UNet is also conditioned on ``add_time_ids`` — each image's original size, crop offset and
target size — which the data stage records per sample. SDXL's own VAE overflows in fp16, so it is
kept in fp32 unless ``model.vae`` names a replacement (e.g. an fp16-safe VAE).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difftune.models.base import Components, ModelFamily, ModelSource
from difftune.models.components import (
    clip_features,
    denoiser_load_kwargs,
    load_subfolder,
    load_vae,
    pipeline_from_single_file,
    vae_decode,
    vae_encode,
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

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def load(self, source: ModelSource, *, dtype: torch.dtype) -> Components:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        unet_kwargs = denoiser_load_kwargs(self.option("model", "quantize", "none"), dtype)
        user_vae = self.option("model", "vae")
        if source.kind == "single_file":
            pipe = pipeline_from_single_file(self.pipeline_class(), source, dtype, denoiser_name="unet",
                                             denoiser_cls=UNet2DConditionModel, denoiser_kwargs=unet_kwargs)
            unet, encoders = pipe.unet, [pipe.text_encoder, pipe.text_encoder_2]
            tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
            vae = load_vae(user_vae, source, dtype, dtype) if user_vae else pipe.vae.to(torch.float32)
            scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        else:
            tokenizers = [load_subfolder(CLIPTokenizer, source, "tokenizer"),
                          load_subfolder(CLIPTokenizer, source, "tokenizer_2")]
            encoders = [load_subfolder(CLIPTextModel, source, "text_encoder", dtype),
                        load_subfolder(CLIPTextModelWithProjection, source, "text_encoder_2", dtype)]
            vae = load_vae(user_vae, source, dtype, torch.float32)
            unet = load_subfolder(UNet2DConditionModel, source, "unet", dtype, **unet_kwargs)
            scheduler = load_subfolder(DDPMScheduler, source, "scheduler")
        return Components(
            denoiser=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers, noise_scheduler=scheduler,
            source=source, encoder_names=["text_encoder", "text_encoder_2"],
        )

    def encode_prompt(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
            states, pooled = clip_features(tokenizer, encoder, captions)
            hidden.append(states)
        # Pooled: the projected embedding of the second (OpenCLIP-G) encoder.
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        return vae_encode(components.vae, pixels)

    def decode_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode(components.vae, latents)

    def time_ids(self, components: Components, batch: dict[str, Any], latents: torch.Tensor) -> torch.Tensor:
        """``add_time_ids`` per sample: original (h, w), crop (top, left), target (h, w)."""
        n = latents.shape[0]
        if "original_sizes" in batch:
            rows = [(*o, *c, *t) for o, c, t in zip(batch["original_sizes"], batch["crop_top_lefts"],
                                                     batch["target_sizes"], strict=True)]
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

    def build_pipeline(self, components: Components, denoiser: nn.Module, text_encoders: list[nn.Module]):
        from diffusers import DPMSolverMultistepScheduler

        return self.pipeline_class()(
            vae=components.vae,
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            unet=denoiser,
            scheduler=DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config),
            add_watermarker=False,
        )


def register(registry) -> None:
    registry.register("sdxl")(StableDiffusionXL)
