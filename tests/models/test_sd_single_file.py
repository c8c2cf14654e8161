"""Single-file (original CompVis/LDM layout) Stable Diffusion checkpoints: export, detection, loading."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors import safe_open

from difftune.errors import DifftuneError
from difftune.models import detect_family, get_family
from difftune.models.base import ModelFamily
from difftune.models.loading import resolve_source
from difftune.models.sd_single_file import save_sd_single_file, unet_to_ldm, vae_to_ldm


def _components(folder, family="sd1"):
    return get_family(family).load(resolve_source(str(folder)), dtype=torch.float32)


def _shapes(path) -> dict[str, list[int]]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def _assert_same_weights(original, loaded, what):
    a, b = original.state_dict(), loaded.state_dict()
    assert set(a) == set(b), f"{what}: tensor names differ: {sorted(set(a) ^ set(b))[:5]}"
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors changed, e.g. {different[:3]}"


def _load_single_file(path, config_folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_folder), safety_checker=None, requires_safety_checker=False
    )


@pytest.fixture(scope="module")
def sd1_file(tiny_sd, tmp_path_factory):
    components = _components(tiny_sd)
    path = tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors"
    get_family("sd1").save_single_file(components, path, metadata={"note": "tiny"})
    return path, components


def test_export_writes_the_original_ldm_layout(sd1_file):
    path, components = sd1_file
    shapes = _shapes(path)
    # Tiny UNet: 2 blocks, 1 layer each. input_blocks: 0 conv_in, 1 resnet+attention, 2 downsampler,
    # 3 resnet; output_blocks: 0-1 resnets (+ upsampler in 1), 2-3 resnet+attention.
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.input_blocks.3.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.2.weight",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        "first_stage_model.decoder.up.0.block.1.conv2.weight",
        "first_stage_model.encoder.mid.block_2.norm1.weight",
        "first_stage_model.encoder.norm_out.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ]:
        assert key in shapes, key
    # VAE mid-block attention is a 1x1 convolution in the original layout, Linear in diffusers.
    width = components.vae.config.block_out_channels[-1]
    for name in ("q", "k", "v", "proj_out"):
        assert shapes[f"first_stage_model.decoder.mid.attn_1.{name}.weight"] == [width, width, 1, 1]
    assert not [k for k in shapes if "down_blocks" in k or "up_blocks" in k or "mid_block." in k]
    n_params = sum(len(m.state_dict()) for m in (components.denoiser, components.vae, *components.text_encoders))
    assert len(shapes) == n_params
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"note": "tiny"}


def test_single_file_loads_back_bit_for_bit_through_diffusers(sd1_file, tiny_sd):
    path, components = sd1_file
    pipe = _load_single_file(path, tiny_sd)
    _assert_same_weights(components.denoiser, pipe.unet, "UNet")
    _assert_same_weights(components.vae, pipe.vae, "VAE")
    _assert_same_weights(components.text_encoders[0], pipe.text_encoder, "text encoder")


def test_export_casts_to_the_requested_dtype(tiny_sd, tmp_path):
    c = _components(tiny_sd)
    path = save_sd_single_file(c.denoiser, c.vae, c.text_encoders[0], tmp_path / "half.safetensors",
                               dtype=torch.float16)
    with safe_open(str(path), framework="pt") as f:
        key = "model.diffusion_model.out.2.weight"
        assert f.get_tensor(key).dtype == torch.float16
        assert torch.equal(f.get_tensor(key), c.denoiser.conv_out.weight.half())
        # layout "auto": a quick-GELU (OpenAI CLIP) text encoder gets the SD 1.x names.
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in f.keys()  # noqa: SIM118


def test_sd2_layout_fuses_text_attention_and_round_trips(tiny_sd_v, tmp_path):
    # Our tiny SD 2.x-style model has an OpenAI-CLIP-shaped text encoder; the OpenCLIP layout is a
    # pure renaming + q/k/v fusion of the same tensors, which is what this checks.
    components = _components(tiny_sd_v, "sd2")
    path = get_family("sd2").save_single_file(components, tmp_path / "tiny-sd2.safetensors")
    shapes = _shapes(path)
    hidden = components.text_encoders[0].config.hidden_size
    assert shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == [3 * hidden, hidden]
    assert shapes["cond_stage_model.model.positional_embedding"] == [77, hidden]
    assert "cond_stage_model.model.transformer.resblocks.1.mlp.c_proj.weight" in shapes
    assert not [k for k in shapes if k.startswith("cond_stage_model.transformer.")]

    source = resolve_source(str(path), config_source=str(tiny_sd_v))
    assert detect_family(source) == "sd2"
    loaded = get_family("sd2").load(source, dtype=torch.float32)
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    _assert_same_weights(components.denoiser, loaded.denoiser, "UNet")
    _assert_same_weights(components.vae, loaded.vae, "VAE")
    _assert_same_weights(components.text_encoders[0], loaded.text_encoders[0], "text encoder")


@pytest.mark.parametrize(("cross_attention_dim", "expected_type"), [(768, "v1"), (1024, "v2")])
def test_real_sd_sizes_give_the_known_original_keys(cross_attention_dim, expected_type):
    """Full-size SD 1.5 / 2.1 UNet and VAE (on the meta device, no memory): the names real files use."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=cross_attention_dim, attention_head_dim=8,
                                    use_linear_projection=cross_attention_dim == 1024)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    ldm_unet = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    ldm_vae = {"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    # The tensor counts of the released SD 1.5 / 2.1 checkpoints.
    assert (len(ldm_unet), len(ldm_vae)) == (686, 248)
    assert tuple(ldm_unet["model.diffusion_model.output_blocks.2.1.conv.weight"].shape) == (1280, 1280, 3, 3)
    assert tuple(ldm_unet["model.diffusion_model.output_blocks.8.2.conv.weight"].shape) == (640, 640, 3, 3)
    assert tuple(ldm_unet["model.diffusion_model.input_blocks.9.0.op.weight"].shape) == (1280, 1280, 3, 3)
    assert "first_stage_model.decoder.up.3.block.2.conv2.weight" in ldm_vae
    assert infer_diffusers_model_type({**ldm_unet, **ldm_vae}) == expected_type
    # diffusers' own reader maps every name back to the module it came from.
    assert set(convert_ldm_unet_checkpoint(ldm_unet, dict(unet.config))) == set(unet.state_dict())
    assert set(convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config))) == set(vae.state_dict())


def test_real_sd2_text_encoder_maps_to_openclip_names():
    """OpenCLIP-H as diffusers ships it for SD 2.x (23 layers), on the meta device."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftune.models.sd_single_file import clip_to_open_clip

    with torch.device("meta"):
        text = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                            num_attention_heads=16, hidden_act="gelu"))
    ldm = {"cond_stage_model.model." + k: v for k, v in clip_to_open_clip(text.state_dict()).items()}
    assert tuple(ldm["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape) == (3072, 1024)
    assert tuple(ldm["cond_stage_model.model.positional_embedding"].shape) == (77, 1024)
    back = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(text, ldm).items()}
    assert set(back) == set(text.state_dict())


def test_detects_the_family_of_single_files(sd1_file, tmp_path):
    path, _ = sd1_file
    assert detect_family(resolve_source(str(path))) == "sd1"
    lora_like = tmp_path / "adapter.safetensors"
    from safetensors.torch import save_file

    save_file({"unet.down_blocks.0.lora_A.weight": torch.zeros(2, 2)}, str(lora_like))
    with pytest.raises(DifftuneError, match=r"not a known single-file model layout.*set model\.family"):
        detect_family(resolve_source(str(lora_like)))


def test_offline_single_file_without_model_config_names_the_key(sd1_file, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path, _ = sd1_file
    with pytest.raises(DifftuneError, match=r"offline.*model\.config"):
        get_family("sd1").load(resolve_source(str(path)), dtype=torch.float32)


def test_model_config_must_be_a_diffusers_folder(sd1_file, tmp_path):
    path, _ = sd1_file
    with pytest.raises(DifftuneError, match=r"model\.config: .*no model_index\.json"):
        get_family("sd1").load(resolve_source(str(path), config_source=str(tmp_path)), dtype=torch.float32)


def test_export_refuses_unmerged_lora_layers(tiny_sd, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    c = _components(tiny_sd)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), c.denoiser)
    with pytest.raises(DifftuneError, match="merge them"):
        get_family("sd1").save_single_file(c, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_families_without_single_file_export_say_so(tmp_path):
    family = types.SimpleNamespace(title="Some Model")
    with pytest.raises(DifftuneError, match="single-file export is not supported for Some Model"):
        ModelFamily.save_single_file(family, None, tmp_path / "x.safetensors")


def test_trains_from_a_single_file(sd1_file, tiny_sd, shapes_data, tmp_path, run_config):
    from difftune import load_config
    from difftune.training.loop import train

    path, _ = sd1_file
    data = run_config(path, shapes_data, tmp_path / "out", train={"max_steps": 2})
    data["model"]["config"] = str(tiny_sd)
    result = train(load_config(data=data), log=lambda *a, **k: None)
    assert result.steps == 2
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    adapters = [f for f in result.files if f.suffix == ".safetensors"]
    assert adapters, result.files
    # The adapter trained on the single file loads onto the original diffusers folder.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(adapters[0]))
    assert pipe.get_active_adapters()


def test_a_quantised_single_file_is_quantised_after_conversion(sd1_file, tiny_sd, tmp_path):
    from difftune import load_config
    from difftune.models.loading import resolve_source
    from difftune.tensors import is_quantized

    path, _ = sd1_file
    config = load_config(data={"model": {"path": str(path), "config": str(tiny_sd), "quantize": "int8",
                                         "quantize_text_encoders": "nf4"}, "data": {"path": str(tmp_path)}})
    components = get_family("sd1", config.model).load(resolve_source(str(path), config_source=str(tiny_sd)),
                                                      dtype=torch.float32)
    for module in (components.denoiser, components.text_encoders[0]):
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(is_quantized(m.weight) for m in linears)
