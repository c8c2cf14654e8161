"""Build small LoRA files on the tiny SD model the way difftune's LoRA method saves them."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_parts(model_dir: Path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    return unet, te


def randomise_lora(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_lora(model_dir: Path, out: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 0,
              text_encoder: bool = True, unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
              diffusers_names: bool = False) -> Path:
    """A LoRA file as difftune's LoRA method saves it, with non-zero B (so it changes the output), alpha != rank.

    ``diffusers_names`` renames keys with ``convert_state_dict_to_diffusers`` (``to_q.lora.down``), as
    older difftune versions and other trainers do.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from difftune.fileio import save_safetensors

    unet, te = load_parts(model_dir)
    parts = {"unet": (unet, list(unet_targets))}
    if text_encoder:
        parts["text_encoder"] = (te, ["q_proj", "k_proj", "v_proj", "out_proj"])
    tensors, meta = {}, {}
    for i, (prefix, (module, targets)) in enumerate(parts.items()):
        module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
        randomise_lora(module, seed + i)
        state = get_peft_model_state_dict(module)
        if diffusers_names:
            state = convert_state_dict_to_diffusers(state)
        tensors.update({f"{prefix}.{k}": v for k, v in state.items()})
        cfg = module.peft_config["default"].to_dict()
        meta.update({f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in cfg.items()})
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(meta, default=str),
              "difftune.base_model": str(model_dir), "difftune.family": "sd1", "difftune.method": "lora"}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pytorch_lora_weights.safetensors"
    save_safetensors(tensors, path, header)
    return path


def pipeline(model_dir: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)


def run(pipe, seed: int = 0, steps: int = 2) -> torch.Tensor:
    out = pipe("a red circle", num_inference_steps=steps, guidance_scale=2.0, height=32, width=32,
               generator=torch.Generator().manual_seed(seed), output_type="pt")
    return out.images
