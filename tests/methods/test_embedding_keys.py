"""Textual-inversion and pivotal embeddings are saved under the keys the family names
(SDXL: ``clip_l``/``clip_g``), and ``difftune generate`` loads them into every text encoder."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from difftune import load_config
from difftune.cli import main
from difftune.inference.generate import load_embedding
from difftune.models import get_family, load_pipeline
from difftune.tiny import build_tiny_sdxl
from difftune.training.loop import train

TOKEN = "<sks>"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.mark.parametrize("method", ["textual_inversion", "pivotal"])
def test_sdxl_embeddings_use_the_family_keys_and_generate_loads_them(tiny_sdxl, shapes_data, run_config, tmp_path,
                                                                     method, capsys):
    family = get_family("sdxl")
    assert family.embedding_save_keys == ("clip_l", "clip_g")
    raw = run_config(tiny_sdxl, shapes_data, tmp_path / "run", train={"max_steps": 1},
                     method={"type": method, "token": TOKEN, "initializer_token": "a"})
    result = train(load_config(data=raw), log=lambda _m: None)
    embeds = load_file(result.output_dir / "learned_embeds.safetensors")
    assert set(embeds) == set(family.embedding_save_keys)
    assert not torch.equal(embeds["clip_l"], embeds["clip_g"])  # one entry per encoder: its own vectors
    out = tmp_path / "images"
    argv = ["generate", "--model", str(tiny_sdxl), "--embedding", str(result.output_dir / "learned_embeds.safetensors"),
            "--prompt", f"a {TOKEN}", "--steps", "1", "--width", "32", "--height", "32", "--out", str(out)]
    if method == "pivotal":
        argv += ["--lora", str(result.output_dir)]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"as {TOKEN}" in capsys.readouterr().out and (out / "grid.png").is_file()
    pipe, _, _ = load_pipeline(str(tiny_sdxl))
    load_embedding(pipe, str(result.output_dir / "learned_embeds.safetensors"), None, log=lambda _m: None)
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(TOKEN)]
        assert torch.equal(row.detach(), embeds[key][0].to(row.dtype))  # each encoder got its own vector
