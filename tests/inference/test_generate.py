"""``difftune generate`` and the loud adapter loading every command uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from adapter_helpers import make_lora
from difftune.cli import main
from difftune.errors import DifftuneError
from difftune.fileio import save_safetensors
from difftune.inference.apply import load_adapters
from difftune.models import load_pipeline


def _gen(tiny_sd, out, *extra):
    argv = ["generate", "--model", str(tiny_sd), "--prompt", "a red circle", "--steps", "2",
            "--guidance", "3", "--seed", "1", "--out", str(out), *extra]
    assert main(argv) == 0
    return np.asarray(Image.open(out / "00-00-seed1.png"), dtype=np.int16)


def test_generate_with_weighted_lora_and_embedding(tiny_sd, lora_a, tmp_path):
    emb = tmp_path / "emb.safetensors"
    save_safetensors({"emb_params": torch.randn(2, 32)}, emb)
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_sd), "--lora", f"{lora_a.parent}:0.7", "--embedding", f"{emb}:<thing>",
                 "--prompt", "a <thing> circle", "--prompt", "a square", "--num-images", "2", "--steps", "2",
                 "--out", str(out), "--scheduler", "euler"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00-00-seed0.png", "00-01-seed1.png", "01-00-seed0.png", "01-01-seed1.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (64, 64)
    settings = json.loads((out / "generate.json").read_text())
    assert settings["loras"] == [[str(lora_a.parent), 0.7]] and settings["scheduler"] == "euler"


def test_lora_weight_changes_the_image(tiny_sd, lora_a, tmp_path):
    base = _gen(tiny_sd, tmp_path / "base")
    zero = _gen(tiny_sd, tmp_path / "zero", "--lora", f"{lora_a}:0")
    strong = _gen(tiny_sd, tmp_path / "strong", "--lora", f"{lora_a}:2")
    assert np.abs(zero - base).max() <= 1
    assert np.abs(strong - base).max() > 3


def test_adapter_for_another_model_is_an_error(tiny_sd, tmp_path, capsys):
    from difftune.adapters.formats import LoraAdapter, LoraModule, to_diffusers

    other = LoraAdapter({"unet.transformer_blocks.0.attn.to_q": LoraModule(torch.ones(2, 8), torch.ones(8, 2), 2.0)})
    tensors, header = to_diffusers(other)
    path = tmp_path / "other.safetensors"
    save_safetensors(tensors, path, header)
    assert main(["generate", "--model", str(tiny_sd), "--lora", str(path), "--prompt", "x", "--steps", "1",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "none of its 1 LoRA modules exist in this model" in err and "Traceback" not in err


def test_partial_match_and_base_mismatch_warn_loudly(tiny_sd, lora_a, tmp_path):
    from difftune.adapters.convert import read_adapter, write_adapter
    from difftune.adapters.formats import LoraModule

    adapter = read_adapter(lora_a)
    adapter.modules["unet.down_blocks.7.attentions.0.proj_in"] = LoraModule(torch.ones(2, 8), torch.ones(8, 2), 2.0)
    adapter.modules["text_encoder.encoder.layers.9.mlp.fc1"] = LoraModule(torch.ones(2, 8), torch.ones(8, 2), 2.0)
    adapter.metadata["difftune.denoiser_config_sha256"] = "0123456789abcdef"
    path = write_adapter(adapter, tmp_path / "partial.safetensors")
    pipe, family, components = load_pipeline(str(tiny_sd))
    lines = []
    load_adapters(pipe, [(str(path), 1.0)], family=family, components=components, log=lines.append)
    text = "\n".join(lines)
    assert "2 of 42 LoRA modules match nothing" in text
    assert "unet.down_blocks.7.attentions.0.proj_in" in text and "text_encoder.encoder.layers.9.mlp.fc1" in text
    assert "config differs from this model's" in text


def test_mixed_key_names_load_completely(tiny_sd, tmp_path):
    """diffusers' own loader drops the renamed attention keys of such files; difftune loads all of them."""
    path = make_lora(tiny_sd, tmp_path / "mixed", rank=2, alpha=2.0, text_encoder=False,
                     unet_targets=("to_q", "proj_in"), diffusers_names=True)
    pipe, _, _ = load_pipeline(str(tiny_sd))
    load_adapters(pipe, [(str(path), 1.0)], log=lambda *_: None)
    loaded = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "adapter_0" in m.lora_A]
    assert sum(n.endswith("to_q") for n in loaded) == 8 and sum(n.endswith("proj_in") for n in loaded) == 4
    pipe, _, _ = load_pipeline(str(tiny_sd))
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="raw")
    raw = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "raw" in m.lora_A]
    assert sum(n.endswith("to_q") for n in raw) == 0  # the silent no-op this module exists to prevent


def test_pickle_adapter_refused(tiny_sd, tmp_path):
    path = tmp_path / "lora.bin"
    torch.save({"unet.a.lora_A.weight": torch.ones(1, 1)}, path)
    pipe, _, _ = load_pipeline(str(tiny_sd))
    with pytest.raises(DifftuneError, match="pickle"):
        load_adapters(pipe, [(str(path), 1.0)])


def test_trained_run_and_its_kohya_copy_load_cleanly(tiny_sd, trained_run, tmp_path):
    kohya = tmp_path / "k.safetensors"
    assert main(["convert", str(trained_run), "--to", "kohya", "-o", str(kohya), "--model", str(tiny_sd)]) == 0
    pipe, family, components = load_pipeline(str(tiny_sd))
    lines = []
    load_adapters(pipe, [(str(trained_run), 1.0), (str(kohya), -1.0)], family=family, components=components,
                  log=lines.append)
    assert lines == [f"loaded {trained_run}: 32 modules, weight 1", f"loaded {kohya}: 32 modules, weight -1"]


def test_diffusers_own_loader_reads_difftune_output_completely(tiny_sd, trained_run):
    from adapter_helpers import pipeline

    pipe = pipeline(tiny_sd)
    pipe.load_lora_weights(str(trained_run))
    layers = [m for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A]
    assert len(layers) == 32 and {m.scaling["default_0"] for m in layers} == {0.5}  # alpha 2 / rank 4


@pytest.mark.parametrize(("extra", "expected"), [
    (["--steps", "0"], "--steps: 0; give at least 1 sampling step"),
    (["--num-images", "0"], "--num-images: 0; give at least 1 image per prompt"),
    (["--guidance", "nan"], "--guidance: nan; give a finite number >= 0"),
    (["--width", "30"], "--width: 30 is not a positive multiple of 8"),
    (["--height", "-8"], "--height: -8 is not a positive multiple of 8"),
])
def test_numbers_the_pipeline_cannot_use_are_one_line(tiny_sd, tmp_path, capsys, extra, expected):
    out = tmp_path / "o"
    assert main(["generate", "--model", str(tiny_sd), "--prompt", "x", "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"difftune: error: {expected}") and not out.exists()
