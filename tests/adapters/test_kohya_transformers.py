"""kohya files for transformer families (Flux, SD3): original module names, fused q/k/v, exact alphas.

diffusers' own Flux kohya reader (``FluxPipeline.load_lora_weights``) must give the same image as the
diffusers-format original; SD3 kohya files (diffusers has no reader) are checked against diffusers'
own original-to-diffusers checkpoint converter and by round trip.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from difftune.adapters import kohya
from difftune.adapters.convert import read_adapter, write_adapter
from difftune.adapters.formats import LoraAdapter, LoraModule
from difftune.cli import main
from difftune.errors import DifftuneError

# --- helpers ------------------------------------------------------------------------------------


def rank_alpha(path: str) -> tuple[int, float]:
    """Mixed ranks and scales, so fused modules must carry per-part scales (alpha != rank throughout)."""
    if path.endswith(("to_k", "add_k_proj")):
        return 2, 5.0
    if path.endswith(("to_v", "add_v_proj")):
        return 4, 3.0
    return 4, 8.0


def random_lora(modules: dict[str, torch.nn.Module], seed: int = 0, std: float = 0.1) -> LoraAdapter:
    """A LoRA on ``{"role.path": module}`` with non-zero up matrices."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in sorted(modules.items()):
        r, a = rank_alpha(name)
        w = mod.weight
        down = torch.randn(r, *w.shape[1:], generator=g) * std
        up = torch.randn(w.shape[0], r, *([1] * (w.dim() - 2)), generator=g) * std
        out[name] = LoraModule(down, up, a)
    return LoraAdapter(out)


def weight_modules(pipe, roles, skip=()) -> dict[str, torch.nn.Module]:
    out = {}
    for role in roles:
        for n, m in getattr(pipe, role).named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not n.startswith(skip):
                if role.startswith("text_encoder") and "layers" not in n:
                    continue
                out[f"{role}.{n}"] = m
    return out


def run(pipe, **kwargs) -> torch.Tensor:
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(0), max_sequence_length=32, **kwargs).images


def load_and_run(pipe_cls, model, file, **kwargs) -> torch.Tensor:
    pipe = pipe_cls.from_pretrained(model)
    if file is not None:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    return run(pipe, **kwargs)


def assert_same_adapter(a: LoraAdapter, b: LoraAdapter, tol: float = 1e-6) -> None:
    assert set(a.modules) == set(b.modules)
    for name, m in a.modules.items():
        other = b.modules[name]
        assert (other.rank, other.alpha) == (m.rank, m.alpha), name
        assert torch.allclose(other.delta(), m.delta(), atol=tol, rtol=0), name


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from difftune.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from difftune.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


# --- Flux -----------------------------------------------------------------------------------------


def lin(out_f: int, in_f: int, r: int, alpha: float, seed: int) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), alpha)


def test_flux_names_fused_qkv_rank_and_alpha():
    d, s = "transformer.transformer_blocks.0.", "transformer.single_transformer_blocks.3."
    adapter = LoraAdapter({
        d + "attn.to_q": lin(32, 32, 4, 8.0, 1), d + "attn.to_k": lin(32, 32, 4, 8.0, 2),
        d + "attn.to_v": lin(32, 32, 4, 8.0, 3), d + "attn.to_out.0": lin(32, 32, 4, 8.0, 4),
        s + "attn.to_q": lin(32, 32, 4, 8.0, 5), s + "proj_mlp": lin(128, 32, 4, 8.0, 6),
        "transformer.norm_out.linear": lin(64, 32, 4, 8.0, 7),
        "text_encoder.encoder.layers.0.self_attn.q_proj": lin(32, 32, 4, 8.0, 8),
    })
    tensors, header = kohya.to_kohya(adapter, "flux")
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (12, 32)
    assert tensors[f"{qkv}.lora_up.weight"].shape == (96, 12)
    assert float(tensors[f"{qkv}.alpha"]) == 24.0  # rank 3r, alpha 3a: alpha / rank unchanged
    up = tensors[f"{qkv}.lora_up.weight"]
    assert torch.equal(up[32:64, 4:8], adapter.modules[d + "attn.to_k"].up) and not up[:32, 4:].any()
    assert float(tensors["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == 8.0  # trained alpha kept
    # single block linear1 = q, k, v, mlp stacked; untrained k and v rows stay zero
    assert tensors["lora_unet_single_blocks_3_linear1.lora_up.weight"].shape == (32 * 3 + 128, 8)
    assert float(tensors["lora_unet_single_blocks_3_linear1.alpha"]) == 16.0
    # diffusers ignores this module's alpha, so the scale is folded into up and alpha = rank
    final = "lora_unet_final_layer_adaLN_modulation_1"
    assert float(tensors[f"{final}.alpha"]) == 4.0
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert header["difftune.family"] == "flux"
    # and back: the same modules, ranks, alphas and factors (bit for bit where scales agree)
    back = kohya.from_kohya(tensors, header)
    assert_same_adapter(adapter, back)
    assert torch.equal(back.modules[d + "attn.to_k"].down, adapter.modules[d + "attn.to_k"].down)


def test_diffusers_reads_fused_single_block_at_flux_width_exactly():
    """diffusers' reader hard-codes Flux.1's widths for linear1 (3072), so check it on tensors of that size."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    s = "transformer.single_transformer_blocks.0."
    # equal ranks: diffusers chunks the down; unequal: every part gets the whole down; the default
    # targets (attention only) leave the MLP rows of linear1 zero
    for ranks in ((2, 2, 2, 2), (2, 1, 2, 3), (4, 4, 4, 0)):
        parts = {s + "attn.to_q": lin(3072, 3072, ranks[0], 3.0, 1), s + "attn.to_k": lin(3072, 3072, ranks[1], 1.0, 2),
                 s + "attn.to_v": lin(3072, 3072, ranks[2], 2.0, 3), s + "proj_mlp": lin(12288, 3072, ranks[3], 5.0, 4)}
        parts = {k: m for k, m in parts.items() if m.rank}
        tensors, _ = kohya.to_kohya(LoraAdapter(parts), "flux")
        converted = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
        probe = torch.randn(3072, 3, dtype=torch.float64)
        for name, m in parts.items():
            a, b = converted[f"{name}.lora_A.weight"].double(), converted[f"{name}.lora_B.weight"].double()
            # diffusers folds alpha / rank into the factors and loads them at scale 1
            want = m.up.double() @ (m.down.double() @ probe) * m.scale
            assert torch.allclose(b @ (a @ probe), want, rtol=1e-5, atol=1e-4), name


def test_flux_final_layer_and_note_on_modules_diffusers_skips():
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    adapter = LoraAdapter({"transformer.x_embedder": lin(32, 64, 2, 2.0, 0),
                           "transformer.transformer_blocks.0.attn.to_out.0": lin(32, 32, 2, 2.0, 1),
                           "transformer.norm_out.linear": lin(64, 32, 2, 6.0, 2)})
    tensors, header = kohya.to_kohya(adapter, "flux")
    # the final adaLN: (shift, scale) rows in the original, alpha folded in (diffusers reads no alpha here)
    converted = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    a, b = converted["norm_out.linear.lora_A.weight"], converted["norm_out.linear.lora_B.weight"]
    assert torch.allclose((b @ a).double(), adapter.modules["transformer.norm_out.linear"].delta(), atol=1e-5)
    # ... but diffusers 0.42 leaves such top-level modules out of the transformer; the note says so
    note = kohya.diffusers_note(tensors, header)
    assert "lora_unet_img_in" in note and "lora_unet_final_layer_adaLN_modulation_1" in note
    assert "double_blocks" not in note


def test_ambiguous_transformer_lora_needs_family():
    adapter = LoraAdapter({"transformer.transformer_blocks.0.attn.to_q": lin(16, 16, 2, 4.0, 0)})
    with pytest.raises(DifftuneError, match="--family"):
        kohya.to_kohya(adapter)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha" in kohya.to_kohya(adapter, "sd3")[0]


def test_foreign_fused_lora_with_shared_down_splits_exactly():
    """A kohya-trained qkv LoRA (one down for q, k and v) read without difftune metadata."""
    fused = lin(96, 32, 6, 3.0, 0)
    tensors = {"lora_unet_double_blocks_2_txt_attn_qkv.lora_down.weight": fused.down,
               "lora_unet_double_blocks_2_txt_attn_qkv.lora_up.weight": fused.up,
               "lora_unet_double_blocks_2_txt_attn_qkv.alpha": torch.tensor(3.0)}
    adapter = kohya.from_kohya(tensors, {})
    names = ["add_q_proj", "add_k_proj", "add_v_proj"]
    got = torch.cat([adapter.modules[f"transformer.transformer_blocks.2.attn.{n}"].delta() for n in names])
    assert torch.allclose(got, fused.delta())
    assert {m.alpha for m in adapter.modules.values()} == {3.0}


def test_flux_kohya_file_loads_in_diffusers_with_identical_image(tiny_flux, tmp_path, capsys):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    # Everything diffusers' Flux reader loads at this width: the double and single blocks except linear1
    # (checked at full width above) and the CLIP text encoder. Global modules: see the note test.
    skip = ("single_transformer_blocks.0.attn.to_", "single_transformer_blocks.0.proj_mlp")
    modules = {k: m for k, m in weight_modules(pipe, ["transformer", "text_encoder"], skip).items()
               if "blocks." in k or k.startswith("text_encoder.")}
    original = write_adapter(random_lora(modules), tmp_path / "d.safetensors")
    k = tmp_path / "k.safetensors"
    assert main(["convert", str(original), "--to", "kohya", "-o", str(k)]) == 0
    assert "note:" not in capsys.readouterr().out  # diffusers reads every module of this file
    with safe_open(str(k), "pt") as f:
        assert "lora_unet_single_blocks_0_linear2.alpha" in set(f.keys())
        assert float(f.get_tensor("lora_unet_double_blocks_0_txt_attn_qkv.alpha")) == 8.0 / 4 * 10
    base = run(pipe, guidance_scale=3.5)
    ref = load_and_run(FluxPipeline, tiny_flux, original, guidance_scale=3.5)
    assert (ref - base).abs().max() > 1e-2  # the LoRA changes the image
    got = load_and_run(FluxPipeline, tiny_flux, k, guidance_scale=3.5)
    assert (got - ref).abs().max() <= 1e-5


def test_flux_every_module_round_trips_through_kohya(tiny_flux, tmp_path, capsys):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    adapter = random_lora(weight_modules(pipe, ["transformer", "text_encoder"]), seed=3)
    original = write_adapter(adapter, tmp_path / "d.safetensors")
    k, back = tmp_path / "k.safetensors", tmp_path / "back.safetensors"
    assert main(["convert", str(original), "--to", "kohya", "-o", str(k)]) == 0  # family inferred
    assert "note: diffusers' Flux.1 kohya reader" in capsys.readouterr().out
    assert main(["convert", str(k), "--to", "diffusers", "-o", str(back)]) == 0
    assert_same_adapter(adapter, read_adapter(back))
    capsys.readouterr()
    assert main(["inspect", str(k), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya" and "Flux.1 original module names" in info["format_title"]
    assert info["kohya_family"] == "flux"
    assert info["lora"]["modules"] == len(adapter.modules)
    ref = load_and_run(FluxPipeline, tiny_flux, original, guidance_scale=3.5)
    got = load_and_run(FluxPipeline, tiny_flux, back, guidance_scale=3.5)
    assert (got - ref).abs().max() <= 1e-5


# --- SD3 ------------------------------------------------------------------------------------------


class _ZerosForMissing(dict):
    """An original-layout checkpoint holding only LoRA deltas; every other weight reads as zeros."""

    def pop(self, key, *default):
        return super().pop(key) if key in self else torch.zeros(6)


def test_sd3_kohya_names_match_diffusers_original_layout():
    """Adding each kohya module's delta to the original (SAI) weight it names, then converting the
    checkpoint with diffusers' own SD3 converter, gives exactly the diffusers LoRA's deltas."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8,
                                  dual_attention_layers=(0,))
    modules = {f"transformer.{n}": m for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    adapter = random_lora(modules, seed=5)
    tensors, _ = kohya.to_kohya(adapter, "sd3")
    sai = _ZerosForMissing()
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            base = key[: -len(".lora_down.weight")]
            m = LoraModule(tensors[key], tensors[f"{base}.lora_up.weight"], float(tensors[f"{base}.alpha"]))
            name = kohya_fused_original(base)
            sai[f"{name}.weight"] = m.delta().float()
    converted = convert_sd3_transformer_checkpoint_to_diffusers(sai)
    for name, m in adapter.modules.items():
        got = converted.pop(name.removeprefix("transformer.") + ".weight")
        assert torch.allclose(got.double(), m.delta(), atol=1e-6), name
    assert not any(v.any() for v in converted.values())  # nothing landed anywhere else


def kohya_fused_original(base: str) -> str:
    """``lora_unet_joint_blocks_0_x_block_attn_qkv`` -> ``joint_blocks.0.x_block.attn.qkv`` via the SD3 table."""
    from difftune.adapters.kohya_fused import layout_for_family

    module, index = layout_for_family("sd3").parse(base.removeprefix("lora_unet_"))
    return module.original.replace("{i}", index or "")


def test_sd3_round_trip_through_kohya_gives_identical_image(tiny_sd3, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    adapter = random_lora(weight_modules(pipe, ["transformer", "text_encoder", "text_encoder_2"]), seed=4)
    adapter.metadata["difftune.family"] = "sd3"
    original = write_adapter(adapter, tmp_path / "d.safetensors")
    k, back = tmp_path / "k.safetensors", tmp_path / "back.safetensors"
    assert main(["convert", str(original), "--to", "kohya", "-o", str(k)]) == 0
    assert "diffusers has no reader for Stable Diffusion 3 kohya files" in capsys.readouterr().out
    with safe_open(str(k), "pt") as f:
        keys = set(f.keys())
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.alpha" in keys
    assert "lora_unet_x_embedder_proj.lora_down.weight" in keys
    assert any(x.startswith("lora_te2_text_model_encoder_layers_0_") for x in keys)
    assert main(["convert", str(k), "--to", "diffusers", "-o", str(back)]) == 0
    assert_same_adapter(adapter, read_adapter(back))
    base = run(pipe, guidance_scale=2.0)
    ref = load_and_run(StableDiffusion3Pipeline, tiny_sd3, original, guidance_scale=2.0)
    assert (ref - base).abs().max() > 1e-2
    got = load_and_run(StableDiffusion3Pipeline, tiny_sd3, back, guidance_scale=2.0)
    assert (got - ref).abs().max() <= 1e-5
