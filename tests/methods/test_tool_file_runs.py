"""Every LoRA variant's run writes the ComfyUI/A1111/Forge file, and its weights are the ones diffusers/peft use.

The file is applied as ComfyUI applies it (tests/tool_rules.py) and compared with the weights diffusers
(LoRA, DoRA, LoKr) or peft (LoHa) produce from the run's own adapter file after fusing it.
"""

from __future__ import annotations

import pytest
import torch
from method_helpers import base_pipeline
from safetensors.torch import load_file

from tool_rules import comfy_apply, comfy_clip_keys, comfy_delta, comfy_unet_keys, weight_modules


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{role}.{n}": m.weight.detach().clone() for role in ("unet", "text_encoder")
            for n, m in weight_modules(getattr(pipe, role)).items()}


def _fused(variant: str, model, out) -> dict[str, torch.Tensor]:
    pipe = base_pipeline(model)
    if variant in ("lora", "dora"):
        pipe.load_lora_weights(out)
        pipe.fuse_lora()
    elif variant == "lokr":
        pipe.unet.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
        pipe.unet.fuse_lora()
    else:
        from peft import LoHaConfig, inject_adapter_in_model, set_peft_model_state_dict

        inject_adapter_in_model(LoHaConfig.from_pretrained(out / "unet"), pipe.unet)
        set_peft_model_state_dict(pipe.unet, load_file(out / "unet" / "adapter_model.safetensors"))
        for module in pipe.unet.modules():
            if hasattr(module, "merge") and hasattr(module, "hada_w1_a"):
                module.merge()
    return {k.replace(".base_layer", ""): v for k, v in _weights(pipe).items()}


@pytest.mark.parametrize("variant", ["lora", "dora", "lokr", "loha"])
def test_run_writes_tool_file_that_comfyui_applies_as_diffusers_does(variant, train_run, tiny_sd):
    method = {"type": "lora", "variant": variant, "rank": 4, "alpha": 2, "train_text_encoder": variant == "lora"}
    result = train_run(method=method, train={"max_steps": 1, "learning_rate": 5e-2})
    out = result.output_dir
    expected_name = "lora_for_comfyui_forge.safetensors" if variant == "dora" else \
        "lora_for_comfyui_a1111_forge.safetensors"
    assert out / expected_name in result.files
    tensors = load_file(out / expected_name)

    pipe = base_pipeline(tiny_sd)
    base = _weights(pipe)
    key_map = {**comfy_unet_keys(pipe.unet), **comfy_clip_keys("sd1", {"text_encoder": pipe.text_encoder})}
    patches, not_loaded = comfy_apply(tensors, key_map)
    assert not_loaded == [] and patches
    assert any(k.startswith("text_encoder.") for k in patches) == (variant == "lora")
    fused = _fused(variant, tiny_sd, out)
    changed = {k for k in base if not torch.equal(base[k], fused[k])}
    assert changed == set(patches)
    for target, patch in patches.items():
        want = (fused[target] - base[target]).double().flatten(1)
        got = comfy_delta(patch, base[target]).reshape(want.shape)
        assert torch.allclose(got, want, atol=2e-6, rtol=1e-4), target

    card = (out / "README.md").read_text()
    assert "### ComfyUI" in card and f"`{expected_name}`" in card
    assert ("<lora:lora_for_comfyui_a1111_forge:1>" in card) == (variant != "dora")


def test_embeddings_for_the_tools_are_named_for_their_prompt_word(train_run):
    method = {"type": "textual_inversion", "token": ["<cat-toy>", "<b>"], "initializer_token": "shape", "num_vectors": 2}
    result = train_run(method=method, train={"max_steps": 1})
    out = result.output_dir
    for i, word in enumerate(("cat-toy", "b")):
        tool = load_file(out / "embeddings_for_comfyui_a1111_forge" / f"{word}.safetensors")
        (diffusers_rows,) = load_file(out / f"learned_embeds_{i}.safetensors").values()
        assert list(tool) == ["clip_l"] and torch.equal(tool["clip_l"], diffusers_rows)
        assert tool["clip_l"].shape[0] == 2
    card = (out / "README.md").read_text()
    assert "`embedding:cat-toy`" in card and "stable-diffusion-webui/embeddings/" in card
    from difftune.publish.push import files_to_push

    assert "embeddings_for_comfyui_a1111_forge/cat-toy.safetensors" in files_to_push(out)


def test_sdxl_embedding_keys_and_refused_tokens(tmp_path):
    from difftune import load_config
    from difftune.adapters.tools import write_embedding_tool_file
    from difftune.errors import ConfigError
    from difftune.models import get_family

    rows = [torch.ones(2, 4), torch.zeros(2, 6)]
    path = write_embedding_tool_file(rows, get_family("sdxl"), "<sks>", tmp_path, {})
    assert path.name == "sks.safetensors"
    saved = load_file(path)
    assert set(saved) == {"clip_l", "clip_g"} and saved["clip_g"].shape == (2, 6)  # A1111: clip_l + clip_g
    bad = {"model": {"path": str(tmp_path)}, "data": {"path": str(tmp_path)},
           "method": {"type": "textual_inversion", "token": ["<a>", "a"], "initializer_token": "x"}}
    with pytest.raises(ConfigError, match="embedding file is named after them"):
        load_config(data=bad, check_paths=False)  # the method's rules run when the config loads (difftune validate too)
