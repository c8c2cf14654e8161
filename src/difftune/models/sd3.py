"""Stable Diffusion 3 and 3.5: MMDiT transformer + CLIP-L, CLIP-G and T5 text encoders, flow matching.

Conditioning follows the SD3 pipeline: the two CLIPs' penultimate hidden states are concatenated,
zero-padded to T5's width and stacked in front of the T5 tokens; their pooled, projected
embeddings are concatenated into one vector. Latents are normalised with the VAE's shift and scale.
"""

from __future__ import annotations

import torch
from torch import nn

from difftune.models.base import Components, ModelSource
from difftune.models.components import (
    ModelParts,
    clip_features,
    flow_match_settings,
    load_components,
    t5_features,
    unwrap,
)
from difftune.models.kohya_names import KohyaModule, KohyaNames, modulation, single
from difftune.models.mmdit import MMDiTFamily


def _sd3_kohya_names() -> KohyaNames:
    """Stability AI's MMDiT module names, as kohya sd-scripts and ComfyUI use them for SD3/3.5 LoRAs."""
    b, x, c = "transformer_blocks.{i}.", "joint_blocks.{i}.x_block.", "joint_blocks.{i}.context_block."
    mods = [
        KohyaModule(x + "attn.qkv", (b + "attn.to_q", b + "attn.to_k", b + "attn.to_v")),
        single(x + "attn.proj", b + "attn.to_out.0"),
        KohyaModule(x + "attn2.qkv", (b + "attn2.to_q", b + "attn2.to_k", b + "attn2.to_v")),  # SD 3.5 medium
        single(x + "attn2.proj", b + "attn2.to_out.0"),
        single(x + "mlp.fc1", b + "ff.net.0.proj"),
        single(x + "mlp.fc2", b + "ff.net.2"),
        modulation(x + "adaLN_modulation.1", b + "norm1.linear"),
        KohyaModule(c + "attn.qkv", (b + "attn.add_q_proj", b + "attn.add_k_proj", b + "attn.add_v_proj")),
        single(c + "attn.proj", b + "attn.to_add_out"),
        single(c + "mlp.fc1", b + "ff_context.net.0.proj"),
        single(c + "mlp.fc2", b + "ff_context.net.2"),
        # Two chunks (shift, scale) in the last block, whose context stream ends there.
        modulation(c + "adaLN_modulation.1", b + "norm1_context.linear"),
        single("x_embedder.proj", "pos_embed.proj"),
        single("context_embedder", "context_embedder"),
        single("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        single("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        single("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        single("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
        single("final_layer.linear", "proj_out"),
        modulation("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ]
    # sd-scripts: lora_te1 CLIP-L, lora_te2 CLIP-G, lora_te3 T5-XXL. diffusers has no reader for these files.
    return KohyaNames(tuple(mods), {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2",
                                    "text_encoder_3": "lora_te3"})


class StableDiffusion3(MMDiTFamily):
    name = "sd3"
    title = "Stable Diffusion 3"
    card_tags = ("sd3", "sd3-diffusers")
    pipeline_class_names = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    single_file_types = ("sd3", "sd35_medium", "sd35_large")
    kohya_names = _sd3_kohya_names()
    # A1111's SD3 reader splits keys on their last two dots, which fails on .alpha tensors.
    lora_tools = ("comfyui", "forge")
    tool_metadata = {"ss_base_model_version": "sd3"}
    tool_embedding_keys = ("clip_l", "clip_g", "t5xxl")
    #: T5 tokens per prompt (the SD3 pipeline's default ``max_sequence_length``).
    t5_max_length = 256

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def load(self, source: ModelSource, *, dtype: torch.dtype, which: str = "all") -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        parts = ModelParts(SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler,
                           ((CLIPTextModelWithProjection, CLIPTokenizer), (CLIPTextModelWithProjection, CLIPTokenizer),
                            (T5EncoderModel, T5TokenizerFast)))
        return load_components(self, parts, source, dtype, which)

    def objective_settings(self, components: Components) -> dict:
        return flow_match_settings(components.noise_scheduler, unwrap(components.denoiser).config.patch_size)

    def lora_encoder_names(self, components: Components) -> list[str]:
        # diffusers' SD3 LoRA loader reads text_encoder and text_encoder_2 keys, never T5's.
        return ["text_encoder", "text_encoder_2"]

    def encode_prompt(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        states, pooled = [], []
        for tokenizer, encoder in zip(components.tokenizers[:2], components.text_encoders[:2], strict=True):
            hidden, vector = clip_features(tokenizer, encoder, captions)
            states.append(hidden)
            pooled.append(vector)
        clip = torch.cat(states, dim=-1)
        t5 = t5_features(components.tokenizers[2], components.text_encoders[2], captions, self.t5_max_length)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled_prompt_embeds": torch.cat(pooled, dim=-1),
        }

    def predict(self, components, denoiser: nn.Module, noisy_latents, timesteps, conditioning, batch):
        # The MMDiT takes the flow-matching time σ·1000 directly (no preconditioning).
        return denoiser(
            hidden_states=noisy_latents,
            timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
