"""The files runs write for ComfyUI, Automatic1111 and Forge, checked against those tools' key rules.

The rules (tests/tool_rules.py, docs/tools.md) are applied to models of the real block layout with
tiny widths, and every module of a LoRA on every UNet layer and every CLIP layer projection must land
on the module it was trained on, with the update diffusers computes (alpha / rank as trained).
"""

from __future__ import annotations

import pytest
import torch

from difftune.adapters import tools
from difftune.adapters.formats import LoraAdapter, LoraModule, to_diffusers
from difftune.models import get_family
from tool_rules import (
    CLIP_MODULES,
    a1111_modules,
    a1111_resolve,
    comfy_apply,
    comfy_clip_keys,
    comfy_delta,
    comfy_unet_keys,
    weight_modules,
)


def skeleton(family: str):
    """UNet and CLIP encoders with the block layout of the real family (2 resnets per block) at tiny width."""
    from diffusers import UNet2DConditionModel

    from difftune.tiny import tiny_clip_text_encoder

    torch.manual_seed(0)
    if family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(8, 8, 8), layers_per_block=2, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2), attention_head_dim=2, use_linear_projection=True,
            cross_attention_dim=16, addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 8)
        return unet, {"text_encoder": tiny_clip_text_encoder(40, 8, 2),
                      "text_encoder_2": tiny_clip_text_encoder(40, 8, 2, projection_dim=8)}
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=8,
        attention_head_dim=2, use_linear_projection=family == "sd2")
    return unet, {"text_encoder": tiny_clip_text_encoder(40, 8, 2)}


def wide_lora(unet, encoders, seed: int = 0) -> LoraAdapter:
    """A LoRA on every UNet linear/conv and every CLIP layer projection, alpha != rank, mixed ranks."""
    g = torch.Generator().manual_seed(seed)
    targets = {f"unet.{p}": m for p, m in weight_modules(unet).items()}
    for role, enc in encoders.items():
        targets.update({f"{role}.{p}": m for p, m in weight_modules(enc).items()
                        if any(p.endswith(c) for c in CLIP_MODULES)})
    out = {}
    for i, (name, mod) in enumerate(sorted(targets.items())):
        rank, alpha = (2, 5.0) if i % 2 else (4, 3.0)
        w = mod.weight
        out[name] = LoraModule(torch.randn(rank, *w.shape[1:], generator=g) * 0.1,
                               torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=g) * 0.1, alpha)
    return LoraAdapter(out)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_module_lands_in_comfyui_forge_and_a1111_at_alpha_over_rank(family):
    unet, encoders = skeleton(family)
    adapter = wide_lora(unet, encoders)
    fam = get_family(family)
    tensors, _ = tools.lora_tool_tensors(adapter, fam)
    assert fam.lora_tools == ("comfyui", "a1111", "forge")

    # ComfyUI and Forge (ComfyUI's key rules): every key loaded, each update = diffusers' (scale alpha / rank)
    for forge in (False, True):
        key_map = {**comfy_unet_keys(unet), **comfy_clip_keys(family, encoders, forge=forge)}
        patches, not_loaded = comfy_apply(tensors, key_map)
        assert not_loaded == []  # ComfyUI would print "lora key not loaded" for each; Forge drops >12
        assert set(patches) == set(adapter.modules)
        for name, m in adapter.modules.items():
            assert torch.allclose(comfy_delta(patches[name]), m.delta().flatten(1), atol=1e-10), name

    # A1111: names converted to the original (LDM / OpenAI / OpenCLIP) modules; scale alpha / rank
    modules = a1111_modules(unet, encoders, family)
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    landed, missed = {}, []
    for base in bases:
        target = a1111_resolve(base, modules, sd2=family == "sd2")
        if target is None:
            missed.append(base)
            continue
        if ":" in target:  # one of q/k/v inside OpenCLIP's fused attention
            target, part = target.split(":")
            target = f"{target}.{part}_proj"
        landed[target] = base
    for target, base in landed.items():
        m = adapter.modules[target]
        assert tensors[f"{base}.lora_down.weight"].shape[0] == m.rank
        assert float(tensors[f"{base}.alpha"]) / m.rank == pytest.approx(m.scale)
    # A1111's converter has SD 1.x's up-block layout for upsamplers (SDXL's first one sits elsewhere) and no
    # rule for SDXL's add_embedding; difftune's default targets (attention) are unaffected (docs/tools.md).
    expected_missed = {"lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_add_embedding_linear_1",
                       "lora_unet_add_embedding_linear_2"} if family == "sdxl" else set()
    assert set(missed) == expected_missed
    assert len(landed) + len(missed) == len(adapter.modules)


def test_diffusers_file_half_loads_in_comfyui_and_inspect_says_so(tmp_path, capsys):
    """The issue's finding, reproduced by the rules: attention and text-encoder keys unrecognised, scale 1."""
    import json

    from difftune.cli import main
    from difftune.fileio import save_safetensors

    unet, encoders = skeleton("sd1")
    adapter = wide_lora(unet, encoders)
    adapter.metadata["difftune.family"] = "sd1"
    tensors, header = to_diffusers(adapter)
    key_map = {**comfy_unet_keys(unet), **comfy_clip_keys("sd1", encoders)}
    patches, not_loaded = comfy_apply(tensors, key_map)
    attention = [n for n in adapter.modules if ".attn1.to_" in n or ".attn2.to_" in n]
    assert attention and not any(n in patches for n in attention)
    assert not any(n.startswith("text_encoder") for n in patches)
    some = next(n for n in patches if n.endswith("proj_in"))
    assert torch.allclose(comfy_delta(patches[some]) * adapter.modules[some].scale,
                          adapter.modules[some].delta().flatten(1))  # loaded at scale 1, not alpha / rank
    assert len(not_loaded) == 2 * (len(adapter.modules) - len(patches))

    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_safetensors(tensors, path, header)
    assert main(["inspect", str(path), "--json"]) == 0
    ready = {r["tool"]: r for r in json.loads(capsys.readouterr().out)["tools"]}
    assert not any(r["ready"] for r in ready.values())
    assert ready["comfyui"]["status"] == "half" and "scale 1" in ready["comfyui"]["note"]
    # inspect's count of unrecognised modules agrees with the rules
    assert f"{len(adapter.modules) - len(patches)} of {len(adapter.modules)} modules are not recognised" in \
        ready["comfyui"]["note"]
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "warning: half-loads in ComfyUI" in text

    kohya = tmp_path / "lora_for_comfyui_a1111_forge.safetensors"
    k_tensors, _ = tools.lora_tool_tensors(adapter, get_family("sd1"))
    save_safetensors(k_tensors, kohya, tools.tool_header(get_family("sd1"), adapter.metadata, "lora"))
    assert main(["inspect", str(kohya), "--json"]) == 0
    ready = {r["tool"]: r["ready"] for r in json.loads(capsys.readouterr().out)["tools"]}
    assert ready == {"comfyui": True, "a1111": True, "forge": True}


def test_kohya_file_without_alpha_is_flagged(tmp_path, capsys):
    import json

    from difftune.cli import main
    from difftune.fileio import save_safetensors

    unet, encoders = skeleton("sd1")
    adapter = wide_lora(unet, encoders)
    k_tensors, header = tools.lora_tool_tensors(adapter, get_family("sd1"))
    k_tensors = {k: v for k, v in k_tensors.items() if not k.endswith(".alpha")}
    path = tmp_path / "k.safetensors"
    save_safetensors(k_tensors, path, header)  # header records alpha != rank
    assert main(["inspect", str(path), "--json"]) == 0
    ready = {r["tool"]: r for r in json.loads(capsys.readouterr().out)["tools"]}
    assert ready["comfyui"]["status"] == "half" and "scale 1" in ready["comfyui"]["note"]


def test_dora_scale_reproduces_peft_in_comfyui():
    """peft: W' = m (W + dW) / ||W + dW|| per output row; ComfyUI divides an output-axis dora_scale by
    ||W||, so the stored scale carries ||W|| / ||W + dW||."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, generator=g)
    m = LoraModule(torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g), 3.0)
    magnitude = torch.rand(6, generator=g) + 0.5
    merged = w.double() + m.delta()
    want = magnitude.double()[:, None] * merged / merged.norm(dim=1, keepdim=True)
    scale = tools.dora_scale(m, magnitude, w)
    assert scale.shape == (6, 1)
    patch = ("lora", m.up, m.down, torch.tensor(m.alpha), scale)
    got = w.double() + comfy_delta(patch, w)
    assert torch.allclose(got, want, atol=1e-5)
