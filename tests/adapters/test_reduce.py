"""DoRA / LoHa / LoKr reduced to a plain LoRA by SVD of the merged updates."""

from __future__ import annotations

import json

import pytest
import torch

from adapter_helpers import load_parts
from difftune.adapters.reduce import kohya_lycoris_deltas, peft_module_deltas, reduce_file
from difftune.cli import main
from difftune.fileio import save_safetensors

TARGETS = ["to_q", "to_k", "proj_in"]


def _config(kind: str):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind == "loha":
        return LoHaConfig(r=2, alpha=3, target_modules=TARGETS)
    if kind == "lokr":
        return LoKrConfig(r=2, alpha=3, target_modules=TARGETS)
    return LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=True)


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)


def _adapted_unet(tiny_sd, kind: str):
    unet, _ = load_parts(tiny_sd)
    unet.add_adapter(_config(kind))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if any(t in name for t in ("hada_", "lokr_", "lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return unet


def _save_peft_file(unet, path):
    from peft.utils import get_peft_model_state_dict

    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    cfg = unet.peft_config["default"].to_dict()
    meta = {f"unet.{k}": sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
    save_safetensors(state, path, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, default=str)})
    return path


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_reduction_reproduces_the_adapted_model(tiny_sd, tmp_path, kind, capsys):
    unet = _adapted_unet(tiny_sd, kind)
    sample, t, cond = _unet_inputs()
    with torch.no_grad():
        expected = unet(sample, t, encoder_hidden_states=cond).sample
    src = _save_peft_file(unet, tmp_path / f"{kind}.safetensors")

    adapter, report = reduce_file(src, rank=64, model=str(tiny_sd))
    assert report.overall_error < 1e-6 and len(adapter.modules) == len(report.module_errors) > 0
    fresh, _ = load_parts(tiny_sd)
    with torch.no_grad():
        plain = fresh(sample, t, encoder_hidden_states=cond).sample
        for name, m in adapter.modules.items():
            fresh.get_submodule(name.split(".", 1)[1]).weight.add_(m.delta().float())
        got = fresh(sample, t, encoder_hidden_states=cond).sample
    assert (expected - plain).abs().max() > 1e-3  # the adapter does something
    assert (got - expected).abs().max() < 1e-4

    out = tmp_path / "small.safetensors"
    assert main(["convert", str(src), "--to-lora", "--rank", "1", "--model", str(tiny_sd),
                 "--to", "kohya", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overall relative Frobenius error" in printed
    assert float(printed.split("error ")[1].split()[0]) > 0.01


def test_peft_file_without_model_is_refused(tiny_sd, tmp_path, capsys):
    src = _save_peft_file(_adapted_unet(tiny_sd, "dora"), tmp_path / "dora.safetensors")
    assert main(["convert", str(src), "--to-lora", "--rank", "4", "--to", "diffusers", "-o", str(tmp_path / "o")]) == 1
    assert "--model" in capsys.readouterr().err
    assert main(["convert", str(src), "--to", "kohya", "-o", str(tmp_path / "o")]) == 1
    assert "--to-lora" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_kohya_lycoris_closed_form_matches_peft(tiny_sd, kind):
    unet = _adapted_unet(tiny_sd, kind)
    deltas = peft_module_deltas(unet)
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet)
    kohya = {}
    for key, value in state.items():
        path, _, leaf = key.rpartition(".")
        kohya[f"lora_unet_{path.replace('.', '_')}.{leaf}"] = value
        kohya[f"lora_unet_{path.replace('.', '_')}.alpha"] = torch.tensor(3.0)
    shapes = {f"unet.{k}": tuple(unet.get_submodule(k).get_base_layer().weight.shape) for k in deltas}
    closed = kohya_lycoris_deltas(kohya, shapes)
    assert set(closed) == {f"unet.{k}" for k in deltas}
    for k, d in deltas.items():
        assert torch.allclose(closed[f"unet.{k}"], d, atol=1e-6)
