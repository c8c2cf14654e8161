"""Write Stable Diffusion 1.x/2.x as one original-layout (CompVis/LDM) ``.safetensors`` file.

This is the layout Automatic1111, ComfyUI and diffusers' ``from_single_file`` read:

- the UNet under ``model.diffusion_model.`` (``input_blocks`` / ``middle_block`` /
  ``output_blocks``),
- the VAE under ``first_stage_model.`` (``encoder.down.N.block.M`` ..., 1x1-conv attention),
- the text encoder under ``cond_stage_model.transformer.`` (SD 1.x, OpenAI CLIP names) or
  ``cond_stage_model.model.`` (SD 2.x, OpenCLIP names with one fused ``in_proj`` per layer).

The mapping is derived from the module structure, so any block count and ``layers_per_block``
works. Each converter checks that every tensor was placed; an unknown tensor is an error rather
than a silently incomplete file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from difftune.errors import DifftuneError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

#: Text-encoder layouts: ``clip`` for SD 1.x (OpenAI CLIP-L), ``open_clip`` for SD 2.x (OpenCLIP-H).
TEXT_ENCODER_LAYOUTS = ("clip", "open_clip")

StateDict = dict[str, torch.Tensor]

# diffusers ResnetBlock2D parameter -> LDM ResBlock parameter (UNet).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# VAE: only the shortcut is renamed inside a resnet; attention and the outer convs are renamed.
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "norm_out",
}


def _rename_head(rest: str, table: Mapping[str, str], where: str) -> str:
    """Rename the module path at the start of ``rest`` (``conv1.weight`` -> ``in_layers.2.weight``)."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise DifftuneError(f"single-file export: no original-layout name for {where}{rest}")


def _layers_per_block(unet_config: Mapping) -> int:
    layers = unet_config.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise DifftuneError(
                f"single-file export: the original layout needs the same layers_per_block in every "
                f"block, this UNet has {list(layers)}"
            )
        layers = layers[0]
    return int(layers)


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping) -> StateDict:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to LDM names (without prefix).

    In the LDM UNet every resnet (+ its attention) and every down/upsampler is one numbered
    entry of ``input_blocks`` / ``output_blocks``; ``input_blocks.0`` is ``conv_in``. With ``L``
    resnets per down block, down block ``b`` layer ``j`` is ``input_blocks.{1 + b(L+1) + j}`` and
    its downsampler ``input_blocks.{(b+1)(L+1)}``; up blocks have ``L+1`` resnets, so up block
    ``b`` layer ``j`` is ``output_blocks.{b(L+1) + j}``, its upsampler sitting in the last one.
    """
    span = _layers_per_block(unet_config) + 1
    up_has_attention = {int(m.group(1)) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}

    def rename(key: str) -> str:
        if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            b, j, rest = int(m[1]), int(m[2]), m[3]
            return f"input_blocks.{1 + b * span + j}.0." + _rename_head(rest, _UNET_RESNET, key)
        if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            return f"input_blocks.{1 + int(m[1]) * span + int(m[2])}.1.{m[3]}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            return f"input_blocks.{(int(m[1]) + 1) * span}.0.op.{m[2]}"
        if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            return f"middle_block.{2 * int(m[1])}." + _rename_head(m[2], _UNET_RESNET, key)
        if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            return f"middle_block.1.{m[1]}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            return f"output_blocks.{int(m[1]) * span + int(m[2])}.0." + _rename_head(m[3], _UNET_RESNET, key)
        if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            return f"output_blocks.{int(m[1]) * span + int(m[2])}.1.{m[3]}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            slot = 2 if b in up_has_attention else 1
            return f"output_blocks.{b * span + span - 1}.{slot}.conv.{m[2]}"
        return _rename_head(key, _UNET_TOP, "")

    return _renamed(state_dict, rename, "UNet")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], vae_config: Mapping) -> StateDict:
    """Rename a diffusers ``AutoencoderKL`` state dict to LDM names (without prefix).

    The LDM decoder numbers its ``up`` levels from the lowest resolution upwards, the reverse of
    diffusers' ``up_blocks``; mid-block attention projections become 1x1 convolutions.
    """
    n_up = len(vae_config["up_block_types"])

    def rename(key: str) -> str:
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            return f"encoder.down.{m[1]}.block.{m[2]}." + _rename_head(m[3], _VAE_RESNET, key)
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}." + _rename_head(m[3], _VAE_RESNET, key)
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            return f"{m[1]}.mid.block_{int(m[2]) + 1}." + _rename_head(m[3], _VAE_RESNET, key)
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            return f"{m[1]}.mid.attn_1." + _rename_head(m[2], _VAE_ATTENTION, key)
        if m := re.fullmatch(r"(encoder|decoder)\.(.+)", key):
            return f"{m[1]}." + _rename_head(m[2], _VAE_TOP, key)
        if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
            return key
        raise DifftuneError(f"single-file export: no original-layout name for VAE tensor {key}")

    out = _renamed(state_dict, rename, "VAE")
    for key, value in out.items():
        # diffusers stores the attention projections as Linear [C, C]; LDM as Conv2d [C, C, 1, 1].
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def _text_model_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """CLIP text-encoder tensors keyed ``text_model.*`` whichever transformers version built it.

    transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` level); the original
    layout and older transformers keep it. ``text_projection`` stays at the top.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("text_model.", "text_projection.")):
            out[key] = value
        else:
            out["text_model." + key] = value
    return out


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """SD 1.x: the OpenAI CLIP layout is transformers' own, one level down (without prefix)."""
    return _text_model_keys(state_dict)


_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def clip_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """SD 2.x: rename a CLIP text encoder to OpenCLIP names (without prefix).

    OpenCLIP keeps q, k and v of each layer in one ``attn.in_proj_weight`` / ``in_proj_bias``
    (concatenated in that order), stores the position embedding as a bare tensor, and its
    ``text_projection`` is the transpose of transformers' Linear weight.
    """
    sd = _text_model_keys(state_dict)
    out: StateDict = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            out[f"transformer.resblocks.{m[1]}." + _rename_head(m[2], _OPEN_CLIP_LAYER, key)] = value
        else:
            raise DifftuneError(f"single-file export: no OpenCLIP name for text-encoder tensor {key}")
    for name, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise DifftuneError(f"single-file export: {name} needs q, k and v projections, found {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _renamed(state_dict: Mapping[str, torch.Tensor], rename: Callable[[str], str], what: str) -> StateDict:
    adapter = [k for k in state_dict if "lora_" in k or ".base_layer." in k]
    if adapter:
        raise DifftuneError(
            f"single-file export: the {what} still holds adapter layers ({adapter[0]}); merge them into "
            "the base weights (peft merge_and_unload) before exporting a single file"
        )
    out: StateDict = {}
    for key, value in state_dict.items():
        new = rename(key)
        if new in out:
            raise DifftuneError(f"single-file export: two {what} tensors map to {new}")
        out[new] = value
    return out


def sd_state_dict(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, text_encoder_layout: str = "auto") -> StateDict:
    """The whole model as one original-layout state dict (tensors are shared, not copied).

    ``text_encoder_layout`` is ``clip`` (SD 1.x), ``open_clip`` (SD 2.x) or ``auto``: ``open_clip``
    when the text encoder uses plain GELU like OpenCLIP-H, else ``clip`` (OpenAI CLIP uses quick-GELU).
    """
    layout = text_encoder_layout
    if layout == "auto":
        layout = "open_clip" if getattr(text_encoder.config, "hidden_act", "") == "gelu" else "clip"
    if layout not in TEXT_ENCODER_LAYOUTS:
        raise DifftuneError(
            f"single-file export: text_encoder_layout {text_encoder_layout!r} is not one of auto, "
            f"{', '.join(TEXT_ENCODER_LAYOUTS)}"
        )
    out: StateDict = {}
    for key, value in unet_to_ldm(unet.state_dict(), unet.config).items():
        out[UNET_PREFIX + key] = value
    for key, value in vae_to_ldm(vae.state_dict(), vae.config).items():
        out[VAE_PREFIX + key] = value
    if layout == "clip":
        text, prefix = clip_to_ldm(text_encoder.state_dict()), CLIP_PREFIX
    else:
        text, prefix = clip_to_open_clip(text_encoder.state_dict()), OPEN_CLIP_PREFIX
    for key, value in text.items():
        out[prefix + key] = value
    return out


def save_sd_single_file(
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    path: str | Path,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    *,
    text_encoder_layout: str = "auto",
) -> Path:
    """Write an SD 1.x/2.x model as one original-layout ``.safetensors`` file; return its path.

    Floating-point tensors are cast to ``dtype`` when given. The file is written to a temporary
    name and renamed into place, so an interrupted export never leaves a half-written file.
    """
    from difftune.fileio import save_safetensors

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise DifftuneError(f"{path}: a single-file checkpoint must end in .safetensors")
    tensors = sd_state_dict(unet, vae, text_encoder, text_encoder_layout)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_safetensors(tensors, path, metadata=dict(metadata or {}))
    return path
