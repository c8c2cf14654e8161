"""Weights holding NaN or infinity: ``inspect`` flags them, ``generate`` refuses them (no black images)."""

from __future__ import annotations

import torch

from difftune.adapters.safe_load import load_tensors
from difftune.cli import main
from difftune.fileio import save_safetensors


def broken_copy(lora_a, tmp_path, value=float("nan")):
    tensors, meta = load_tensors(lora_a)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    out = tmp_path / "broken.safetensors"
    save_safetensors(tensors, out, metadata=meta)
    return out, name


def test_inspect_flags_non_finite_tensors(lora_a, tmp_path, capsys):
    assert main(["inspect", str(lora_a)]) == 0
    assert "NaN" not in capsys.readouterr().out
    for value in (float("nan"), float("inf")):
        broken, name = broken_copy(lora_a, tmp_path, value)
        assert main(["inspect", str(broken)]) == 1
        out = capsys.readouterr().out
        assert f"warning: 1 tensor(s) hold NaN or infinity (e.g. {name})" in out


def test_generate_refuses_a_lora_or_embedding_with_non_finite_weights(tiny_sd, lora_a, tmp_path, capsys):
    broken, name = broken_copy(lora_a, tmp_path)
    out = tmp_path / "images"
    argv = ["generate", "--model", str(tiny_sd), "--prompt", "a circle", "--steps", "1", "--out", str(out)]
    assert main([*argv, "--lora", str(broken)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{broken}: 1 tensor(s) hold NaN or infinity (e.g. {name})" in err and len(err.splitlines()) == 1
    assert not out.exists()
    emb = tmp_path / "emb.safetensors"
    save_safetensors({"emb_params": torch.full((1, 32), float("inf"))}, emb)
    assert main([*argv, "--embedding", f"{emb}:<x>"]) == 1
    assert "emb.safetensors: 1 tensor(s) hold NaN or infinity (e.g. emb_params)" in capsys.readouterr().err
    assert not out.exists()
