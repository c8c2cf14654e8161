"""diffusers <-> kohya conversion: names kohya loaders expect, alphas as trained, identical images."""

from __future__ import annotations

import torch
from safetensors import safe_open

from adapter_helpers import load_parts, pipeline, run
from difftune.adapters import kohya
from difftune.adapters.convert import read_adapter
from difftune.cli import main
from difftune.inference.apply import weight_module_names


def test_kohya_names_and_alpha(lora_a, tmp_path):
    out = tmp_path / "k.safetensors"
    assert main(["convert", str(lora_a.parent), "--to", "kohya", "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
        te_alpha = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha")
        meta = f.metadata()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight" in keys
    assert float(alpha) == 8.0 and float(te_alpha) == 8.0  # trained alpha, not the rank (4)
    assert meta["difftune.base_model"] and "difftune.modules" in meta


def test_vocabulary_unflatten_restores_every_module_name(tiny_sd):
    unet, te = load_parts(tiny_sd)
    names = weight_module_names(unet) + ["text_model." + n for n in weight_module_names(te)]
    wrong = [n for n in names if kohya.unflatten(n.replace(".", "_")) != n]
    assert not wrong, wrong[:5]


def test_round_trip_is_lossless(lora_a, tmp_path):
    original = read_adapter(lora_a)
    k = tmp_path / "k.safetensors"
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(lora_a), "--to", "kohya", "-o", str(k)]) == 0
    assert main(["convert", str(k), "--to", "diffusers", "-o", str(back)]) == 0
    again = read_adapter(back)
    assert set(again.modules) == set(original.modules)
    for name, m in original.modules.items():
        assert torch.equal(again.modules[name].down, m.down) and torch.equal(again.modules[name].up, m.up)
        assert again.modules[name].alpha == m.alpha == 8.0


def test_diffusers_loads_kohya_file_with_identical_output(tiny_sd, lora_a, tmp_path):
    k = tmp_path / "k.safetensors"
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(lora_a), "--to", "kohya", "-o", str(k)]) == 0
    assert main(["convert", str(k), "--to", "diffusers", "-o", str(back)]) == 0
    pipe = pipeline(tiny_sd)
    base = run(pipe)
    pipe.load_lora_weights(str(lora_a.parent), weight_name=lora_a.name)
    ref = run(pipe)
    assert (ref - base).abs().max() > 1e-3  # the adapter does something
    for file in (k, back):
        pipe = pipeline(tiny_sd)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        assert len(pipe.text_encoder.peft_config) == 1  # the text-encoder half loaded too
        assert (run(pipe) - ref).abs().max() <= 1e-5


def test_two_text_encoders_use_te1_te2_and_diffusers_reads_them_back():
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    from difftune.adapters.formats import LoraAdapter, LoraModule

    def mod():
        return LoraModule(torch.randn(2, 8), torch.randn(8, 2), alpha=3.0)

    adapter = LoraAdapter({
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": mod(),
        "text_encoder.encoder.layers.0.self_attn.q_proj": mod(),
        "text_encoder_2.encoder.layers.3.mlp.fc1": mod(),
    })
    tensors, _ = kohya.to_kohya(adapter)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    assert "lora_te2_text_model_encoder_layers_3_mlp_fc1.lora_up.weight" in tensors
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(tensors))
    assert any(k.startswith("text_encoder_2.") for k in converted)
    assert set(alphas.values()) == {3.0}
    back = kohya.from_kohya(tensors, {})
    assert set(back.modules) == set(adapter.modules)


def test_kohya_file_with_original_sgm_block_names(tiny_sd, lora_a, tmp_path, capsys):
    """kohya sd-scripts names SDXL blocks as in the original UNet (input_blocks_4_1_...)."""
    original = read_adapter(lora_a)
    tensors, _ = kohya.to_kohya(original)
    # tiny UNet: 1 layer per block, so down_blocks.0.attentions.0 is input_blocks.1.1, mid is middle_block.1,
    # up_blocks.1.attentions.j is output_blocks.(2 + j).1
    sgm = {}
    for key, value in tensors.items():
        key = key.replace("down_blocks_0_attentions_0_", "input_blocks_1_1_")
        key = key.replace("mid_block_attentions_0_", "middle_block_1_")
        key = key.replace("up_blocks_1_attentions_0_", "output_blocks_2_1_")
        key = key.replace("up_blocks_1_attentions_1_", "output_blocks_3_1_")
        sgm[key] = value
    src = tmp_path / "sgm.safetensors"
    from difftune.fileio import save_safetensors

    save_safetensors(sgm, src)
    out = tmp_path / "d.safetensors"
    assert main(["convert", str(src), "--to", "diffusers", "-o", str(out)]) == 1
    assert "needs the base model" in capsys.readouterr().err
    assert main(["convert", str(src), "--to", "diffusers", "-o", str(out), "--model", str(tiny_sd)]) == 0
    back = read_adapter(out)
    assert set(back.modules) == set(original.modules)
    name = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"
    assert torch.equal(back.modules[name].up, original.modules[name].up)
