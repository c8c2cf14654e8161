"""Stable Diffusion 1.x and 2.x: UNet + one CLIP text encoder + VAE, DDPM objective."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.models.base import Components, ModelFamily, ModelSource
from difftune.models.components import (
    ModelParts,
    load_components,
    load_subfolder,
    module_device,
    tokenize,
)

__all__ = ["StableDiffusion", "StableDiffusion2", "load_subfolder"]


class StableDiffusion(ModelFamily):
    name = "sd1"
    title = "Stable Diffusion 1.x"
    objective = "ddpm"
    denoiser_name = "unet"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    card_tags = ("stable-diffusion", "stable-diffusion-diffusers")
    single_file_types: tuple[str, ...] = ("v1",)
    writes_single_file = True
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    is_v2 = False
    #: Text-encoder layout in an original-layout single file (see ``sd_single_file``).
    single_file_text_layout = "clip"

    pipeline_class_names = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")

    @classmethod
    def matches(cls, source: ModelSource, single_file_type: str | None) -> bool:
        # SD 1.x and 2.x share a pipeline class; the text-encoder width tells them apart.
        if single_file_type is not None or not super().matches(source, None):
            return super().matches(source, single_file_type)
        return cls._is_v2(source) == cls.is_v2

    @staticmethod
    def _is_v2(source: ModelSource) -> bool:
        """SD 2.x uses a 1024-wide OpenCLIP text encoder; SD 1.x a 768-wide CLIP (tiny models: others)."""
        import json
        from pathlib import Path

        if source.kind != "folder":
            return False
        cfg = Path(source.path) / "unet" / "config.json"
        if not cfg.is_file():
            return False
        return json.loads(cfg.read_text()).get("cross_attention_dim") == 1024

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def load(self, source: ModelSource, *, dtype: torch.dtype, which: str = "all") -> Components:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        parts = ModelParts(UNet2DConditionModel, DDPMScheduler, ((CLIPTextModel, CLIPTokenizer),),
                           single_file_kwargs={"safety_checker": None, "requires_safety_checker": False})
        return load_components(self, parts, source, dtype, which)

    def load_tokenizers(self, source: ModelSource) -> list[Any]:
        from transformers import CLIPTokenizer

        if source.kind == "single_file":
            if not source.config_source:
                return []
            source = ModelSource(source.config_source, "folder", source.revision)
        return [load_subfolder(CLIPTokenizer, source, "tokenizer")]

    def save_single_file(self, components: Components, path, denoiser=None, text_encoders=None, *,
                         dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> Path:
        from difftune.models.sd_single_file import save_sd_single_file

        return save_sd_single_file(
            denoiser if denoiser is not None else components.denoiser,
            components.vae,
            (text_encoders or components.text_encoders)[0],
            path,
            dtype=dtype,
            metadata=metadata,
            text_encoder_layout=self.single_file_text_layout,
        )

    def encode_prompt(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer, text_encoder = components.tokenizers[0], components.text_encoders[0]
        ids = tokenize(tokenizer, captions, tokenizer.model_max_length, module_device(text_encoder))
        return {"encoder_hidden_states": text_encoder(ids, return_dict=False)[0]}

    def predict(self, components, denoiser: nn.Module, noisy_latents, timesteps, conditioning, batch):
        return denoiser(
            noisy_latents,
            timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            return_dict=False,
        )[0]


class StableDiffusion2(StableDiffusion):
    name = "sd2"
    title = "Stable Diffusion 2.x"
    single_file_types = ("v2",)
    is_v2 = True
    single_file_text_layout = "open_clip"
    tool_metadata = {"ss_base_model_version": "sd_v2", "ss_v2": "True"}
    tool_embedding_keys = ("clip_h",)
