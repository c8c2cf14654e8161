"""Textual inversion: only the new rows change, the file loads with load_textual_inversion, SDXL-style files."""

from __future__ import annotations

import numpy as np
import torch
from method_helpers import base_pipeline, pipeline_image
from safetensors.torch import load_file

from difftune.data.batch import Batch

TI = {"type": "textual_inversion", "token": "<sks>", "initializer_token": "dog", "num_vectors": 2}


def _load(tiny_sd, tmp_path, run_config, shapes_data, **method):
    from difftune import load_config
    from difftune.methods import METHODS
    from difftune.models import detect_family, get_family
    from difftune.models.loading import resolve_source

    config = load_config(data=run_config(tiny_sd, shapes_data, tmp_path, method={**TI, **method}))
    source = resolve_source(str(tiny_sd), None, None, None)
    family = get_family(detect_family(source, "auto"))
    components = family.load(source, dtype=torch.float32)
    method = METHODS.get(config.method.type).build(config.method, family)
    return config, family, components, method


def test_only_new_rows_change_even_with_weight_decay(tiny_sd, tmp_path, run_config, shapes_data):
    config, family, components, method = _load(tiny_sd, tmp_path, run_config, shapes_data)
    original = components.text_encoders[0].get_input_embeddings().weight.detach().clone()
    method.prepare(components)
    tokenizer = components.tokenizers[0]
    first = tokenizer.convert_tokens_to_ids("<sks>")
    assert first == original.shape[0] and tokenizer.convert_tokens_to_ids("<sks>_1") == first + 1
    optimizer = torch.optim.AdamW(method.param_groups(components, 1e-2), weight_decay=0.1)
    for step in range(1, 4):
        batch = method.prepare_batch(Batch(captions=["a red circle"]))
        assert "<sks> <sks>_1" in batch.captions[0]
        out = family.encode_prompt(components, batch.captions)["encoder_hidden_states"]
        out.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        method.on_step_end(step, components)
    weight = components.text_encoders[0].get_input_embeddings().weight.detach()
    assert torch.equal(weight[:first], original), "a row other than the new tokens changed"
    init = original[tokenizer("dog", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(weight[first], init), "the new token did not train"


def test_without_restoring_rows_weight_decay_would_move_them(tiny_sd, tmp_path, run_config, shapes_data):
    """Guards the test above: the optimizer really does touch the other rows."""
    config, family, components, method = _load(tiny_sd, tmp_path, run_config, shapes_data)
    original = components.text_encoders[0].get_input_embeddings().weight.detach().clone()
    method.prepare(components)
    optimizer = torch.optim.AdamW(method.param_groups(components, 1e-2), weight_decay=0.1)
    out = family.encode_prompt(components, method.prepare_batch(Batch(captions=["x"])).captions)
    out["encoder_hidden_states"].pow(2).mean().backward()
    optimizer.step()
    weight = components.text_encoders[0].get_input_embeddings().weight.detach()
    assert not torch.equal(weight[: original.shape[0]], original)


def test_trained_embedding_loads_with_load_textual_inversion(train_run, tiny_sd):
    result = train_run(method=TI, train={"max_steps": 3})
    path = result.output_dir / "learned_embeds.safetensors"
    saved = load_file(path)
    assert list(saved) == ["<sks>"] and saved["<sks>"].shape == (2, 32)
    pipe = base_pipeline(tiny_sd)
    before = pipeline_image(pipe, "a photo of <sks>")
    pipe.load_textual_inversion(result.output_dir, token="<sks>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), saved["<sks>"])
    assert not np.allclose(before, pipeline_image(pipe, "a photo of <sks>"))
    assert 'load_textual_inversion("' in (result.output_dir / "README.md").read_text()


def test_two_encoder_family_saves_one_key_per_encoder(tmp_path, tiny_sd):
    """SDXL-style: both encoders get rows, saved under the family's keys (clip_l / clip_g)."""
    from transformers import CLIPTokenizer

    from difftune.methods.embeddings import PlaceholderEmbeddings
    from difftune.models.base import Components
    from difftune.tiny import tiny_clip_text_encoder, write_char_clip_tokenizer

    write_char_clip_tokenizer(tmp_path / "tok")
    tokenizers = [CLIPTokenizer.from_pretrained(tmp_path / "tok") for _ in range(2)]
    encoders = [tiny_clip_text_encoder(len(tokenizers[0]), 32, 1), tiny_clip_text_encoder(len(tokenizers[0]), 48, 1)]
    components = Components(denoiser=torch.nn.Linear(1, 1), vae=torch.nn.Linear(1, 1), text_encoders=encoders,
                            tokenizers=tokenizers, noise_scheduler=None, source=None,
                            encoder_names=["text_encoder", "text_encoder_2"])
    emb = PlaceholderEmbeddings(["<a>", "<b>"], ["cat"], 3, "object")
    emb.add(components)
    files = emb.export(components, tmp_path, ["clip_l", "clip_g"], {})
    assert [f.name for f in files] == ["learned_embeds_0.safetensors", "learned_embeds_1.safetensors"]
    state = load_file(files[1])
    assert set(state) == {"clip_l", "clip_g"}
    assert state["clip_l"].shape == (3, 32) and state["clip_g"].shape == (3, 48)
    snippet = emb.load_snippet(components.encoder_names, ["clip_l", "clip_g"])
    assert 'state["clip_g"], token="<b>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2' in snippet

    # What the snippet does, against diffusers' own loader.
    fresh_tok = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    fresh_enc = tiny_clip_text_encoder(len(fresh_tok), 48, 1)
    base_pipeline(tiny_sd).load_textual_inversion(state["clip_g"], token="<b>", text_encoder=fresh_enc, tokenizer=fresh_tok)
    ids = fresh_tok.convert_tokens_to_ids(["<b>", "<b>_1", "<b>_2"])
    assert torch.equal(fresh_enc.get_input_embeddings().weight[ids].detach(), state["clip_g"])


def test_style_templates_and_plain_captions(tiny_sd, tmp_path, run_config, shapes_data):
    *_, method = _load(tiny_sd, tmp_path, run_config, shapes_data, templates="style")
    assert "in the style of <sks> <sks>_1" in method.prepare_batch(Batch(captions=["x"])).captions[0]
    *_, method = _load(tiny_sd, tmp_path, run_config, shapes_data, templates="none")
    assert method.prepare_batch(Batch(captions=["my <sks> toy"])).captions == ["my <sks> <sks>_1 toy"]
