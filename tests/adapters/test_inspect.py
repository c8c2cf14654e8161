"""``difftune inspect`` recognises files from difftune and from other tools."""

from __future__ import annotations

import json

import torch

from difftune.cli import main
from difftune.fileio import save_safetensors


def _inspect(path, capsys) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_trained_adapter_metadata_coverage_and_norms(trained_run, capsys):
    info = _inspect(trained_run, capsys)
    assert info["format"] == "diffusers"
    meta = info["difftune"]
    for key in ("base_model", "denoiser_config_sha256", "family", "method", "steps", "trigger", "version"):
        assert meta[key], key
    assert meta["trigger"] == "sks shape" and meta["steps"] == "2"
    assert meta["modules"]["rank_alpha"] == {"4/2": info["lora"]["modules"]}  # rank 4, alpha 2 per module
    lora = info["lora"]
    assert lora["modules"] == 32 and lora["roles"] == {"unet": 32}
    assert set(lora["blocks"]) == {"unet.down_blocks.0", "unet.mid_block.attentions.0", "unet.up_blocks.1"}
    assert lora["update_norm_total"] > 0
    assert main(["inspect", str(trained_run)]) == 0
    text = capsys.readouterr().out
    assert "rank/alpha: 4/2 ×32" in text and "update norm" in text


def test_kohya_with_ss_metadata_and_lycoris(lora_a, tmp_path, capsys):
    from difftune.adapters.convert import read_adapter
    from difftune.adapters.kohya import to_kohya

    tensors, _ = to_kohya(read_adapter(lora_a))
    path = tmp_path / "k.safetensors"
    save_safetensors(tensors, path, {"ss_network_dim": "4", "ss_network_alpha": "8", "ss_output_name": "thing"})
    info = _inspect(path, capsys)
    assert info["format"] == "kohya" and "ss_" in info["format_title"]
    assert info["kohya_training"]["ss_network_alpha"] == "8"
    assert info["lora"]["rank_alpha"] == {"4/8": 40}
    assert info["lora"]["roles"] == {"unet": 32, "text_encoder": 8}

    loha = {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.ones(8, 2),
            "lora_unet_mid_block_attentions_0_proj_in.hada_w1_b": torch.ones(2, 8),
            "lora_unet_mid_block_attentions_0_proj_in.hada_w2_a": torch.ones(8, 2),
            "lora_unet_mid_block_attentions_0_proj_in.hada_w2_b": torch.ones(2, 8),
            "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(1.0)}
    save_safetensors(loha, path)
    info = _inspect(path, capsys)
    assert info["format"] == "kohya_loha" and info["modules"]["count"] == 1
    lokr = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1": torch.ones(2, 2),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2": torch.ones(4, 4)}
    save_safetensors(lokr, path)
    assert _inspect(path, capsys)["format"] == "kohya_lokr"


def test_embeddings_and_checkpoints(tiny_sd, tmp_path, capsys):
    path = tmp_path / "emb.safetensors"
    save_safetensors({"emb_params": torch.ones(2, 32)}, path)
    info = _inspect(path, capsys)
    assert info["format"] == "textual_inversion" and info["embedding"]["emb_params"]["vectors"] == 2
    save_safetensors({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}, path)
    assert _inspect(path, capsys)["format"] == "textual_inversion"
    info = _inspect(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors", capsys)
    assert info["format"] == "checkpoint_diffusers" and info["parameters"] > 100_000
    save_safetensors({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 2)}, path)
    assert _inspect(path, capsys)["format"] == "checkpoint_ldm"
