"""Flux.1 dev and schnell: a rectified-flow transformer over packed 2×2 latent patches.

Conditioning is T5's token sequence plus CLIP-L's pooled vector. Latents are packed into a
sequence of 2×2 patches with (0, row, column) position ids, text tokens get zero ids. The dev
model is guidance-distilled: its guidance embedding receives ``train.guidance_scale``; schnell
has none. Flow matching uses the scheduler's resolution-dependent shift.
"""

from __future__ import annotations

import torch
from torch import nn

from difftune.models.base import Components, ModelSource
from difftune.models.components import (
    ModelParts,
    denoiser_config,
    flow_match_settings,
    load_components,
    module_device,
    t5_features,
    tokenize,
    unwrap,
)
from difftune.models.kohya_names import KohyaModule, KohyaNames, modulation, single
from difftune.models.mmdit import MMDiTFamily


def _flux_kohya_names() -> KohyaNames:
    """Black Forest Labs' module names, as kohya sd-scripts, ComfyUI and Forge use them for Flux LoRAs."""
    d, s = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
    mods = [
        KohyaModule("double_blocks.{i}.img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")),
        single("double_blocks.{i}.img_attn.proj", d + "attn.to_out.0"),
        single("double_blocks.{i}.img_mlp.0", d + "ff.net.0.proj"),
        single("double_blocks.{i}.img_mlp.2", d + "ff.net.2"),
        modulation("double_blocks.{i}.img_mod.lin", d + "norm1.linear"),
        KohyaModule("double_blocks.{i}.txt_attn.qkv",
                    (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")),
        single("double_blocks.{i}.txt_attn.proj", d + "attn.to_add_out"),
        single("double_blocks.{i}.txt_mlp.0", d + "ff_context.net.0.proj"),
        single("double_blocks.{i}.txt_mlp.2", d + "ff_context.net.2"),
        modulation("double_blocks.{i}.txt_mod.lin", d + "norm1_context.linear"),
        # linear1 computes q, k, v and the MLP input at once (MLP width 4x the model width).
        KohyaModule("single_blocks.{i}.linear1", (s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"),
                    widths=(1, 1, 1, 4)),
        single("single_blocks.{i}.linear2", s + "proj_out"),
        modulation("single_blocks.{i}.modulation.lin", s + "norm.linear"),
        single("img_in", "x_embedder"),
        single("txt_in", "context_embedder"),
        single("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        single("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        single("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        single("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        single("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        single("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        KohyaModule("final_layer.linear", ("proj_out",), diffusers_reads_alpha=False),
        modulation("final_layer.adaLN_modulation.1", "norm_out.linear", diffusers_reads_alpha=False),
    ]
    # sd-scripts: lora_te1 is CLIP-L, lora_te3 is T5-XXL.
    return KohyaNames(tuple(mods), {"text_encoder": "lora_te1", "text_encoder_2": "lora_te3"},
                      diffusers_converter="diffusers.loaders.lora_conversion_utils._convert_kohya_flux_lora_to_diffusers")


class Flux(MMDiTFamily):
    name = "flux"
    title = "Flux.1"
    card_tags = ("flux", "flux-diffusers")
    pipeline_class_names = ("FluxPipeline", "FluxImg2ImgPipeline")
    single_file_types = ("flux-dev", "flux-schnell")
    kohya_names = _flux_kohya_names()
    lora_tools = ("comfyui", "forge")  # A1111 has no Flux
    tool_metadata = {"ss_base_model_version": "flux1"}
    tool_embedding_keys = ("clip_l", "t5xxl")

    def pipeline_class(self) -> type:
        from diffusers import FluxPipeline

        return FluxPipeline

    def load(self, source: ModelSource, *, dtype: torch.dtype, which: str = "all") -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        parts = ModelParts(FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler,
                           ((CLIPTextModel, CLIPTokenizer), (T5EncoderModel, T5TokenizerFast)))
        return load_components(self, parts, source, dtype, which)

    def objective_settings(self, components: Components) -> dict:
        # The shift's sequence length counts packed 2×2 patches.
        return flow_match_settings(components.noise_scheduler, patch_size=2)

    def lora_encoder_names(self, components: Components) -> list[str]:
        # diffusers' Flux LoRA loader reads transformer and text_encoder (CLIP) keys, not T5's.
        return ["text_encoder"]

    def t5_max_length(self, components: Components) -> int:
        # The pipelines' limits: 512 tokens for dev (guidance-distilled), 256 for schnell.
        return 512 if denoiser_config(components).guidance_embeds else 256

    def encode_prompt(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        clip_tok, clip = components.tokenizers[0], components.text_encoders[0]
        ids = tokenize(clip_tok, captions, clip_tok.model_max_length, module_device(clip))
        pooled = clip(ids, output_hidden_states=False).pooler_output
        t5 = t5_features(components.tokenizers[1], components.text_encoders[1], captions,
                         self.t5_max_length(components))
        return {"prompt_embeds": t5, "pooled_prompt_embeds": pooled}

    def predict(self, components, denoiser: nn.Module, noisy_latents, timesteps, conditioning, batch):
        # The pipeline's private packing helpers; tests/models/test_flux_packing.py pins what they do.
        pipe = self.pipeline_class()
        b, c, h, w = noisy_latents.shape
        packed = pipe._pack_latents(noisy_latents, b, c, h, w)
        prompt = conditioning["prompt_embeds"]
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, noisy_latents.device, noisy_latents.dtype)
        txt_ids = torch.zeros(prompt.shape[1], 3, device=noisy_latents.device, dtype=noisy_latents.dtype)
        guidance = None
        if unwrap(denoiser).config.guidance_embeds:
            guidance = torch.full((b,), float(self.train.guidance_scale), device=noisy_latents.device,
                                  dtype=torch.float32)
        out = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,  # Flux's transformer takes σ itself and scales it internally
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=prompt,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        # With a scale factor of 1 the pipeline's unpacking takes latent (not pixel) sizes.
        return pipe._unpack_latents(out, h, w, 1)
