"""DoRA, LoHa and LoKr train, save, reload through the loader each is documented with, and change the image."""

from __future__ import annotations

import json

import numpy as np
import torch
from method_helpers import base_pipeline, pipeline_image
from safetensors import safe_open
from safetensors.torch import load_file


def _peft_state(module):
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=next(iter(module.peft_config)))


def test_dora_loads_with_load_lora_weights(train_run, tiny_sd):
    result = train_run(method={"variant": "dora", "init": "gaussian"}, train={"max_steps": 2})
    saved = load_file(result.output_dir / "pytorch_lora_weights.safetensors")
    assert any("lora_magnitude_vector" in k for k in saved)
    pipe = base_pipeline(tiny_sd)
    before = pipeline_image(pipe)
    pipe.load_lora_weights(result.output_dir)
    config = next(iter(pipe.unet.peft_config.values()))
    assert config.use_dora
    assert not np.allclose(before, pipeline_image(pipe))


def test_lokr_loads_with_load_lora_adapter(train_run, tiny_sd):
    from peft import LoKrConfig

    result = train_run(method={"variant": "lokr"}, train={"max_steps": 2})
    path = result.output_dir / "pytorch_lora_weights.safetensors"
    saved = {k.removeprefix("unet."): v for k, v in load_file(path).items()}
    pipe = base_pipeline(tiny_sd)
    before = pipeline_image(pipe)
    pipe.unet.load_lora_adapter(result.output_dir, weight_name=path.name, prefix="unet")
    assert isinstance(next(iter(pipe.unet.peft_config.values())), LoKrConfig)
    loaded = _peft_state(pipe.unet)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not np.allclose(before, pipeline_image(pipe))


def test_loha_loads_with_peft(train_run, tiny_sd):
    from peft import LoHaConfig, inject_adapter_in_model, set_peft_model_state_dict

    result = train_run(method={"variant": "loha"}, train={"max_steps": 2})
    folder = result.output_dir / "unet"
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LOHA"
    saved = load_file(folder / "adapter_model.safetensors")
    pipe = base_pipeline(tiny_sd)
    before = pipeline_image(pipe)
    inject_adapter_in_model(LoHaConfig.from_pretrained(folder), pipe.unet)
    set_peft_model_state_dict(pipe.unet, saved)
    loaded = _peft_state(pipe.unet)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not np.allclose(before, pipeline_image(pipe))
    card = (result.output_dir / "README.md").read_text()
    assert "LoHaConfig.from_pretrained" in card


def test_rank_and_alpha_patterns_are_saved_and_restored(train_run, tiny_sd):
    module = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    result = train_run(method={"rank": 4, "rank_pattern": {module: 2}, "alpha_pattern": {module: 8.0}},
                       train={"max_steps": 1})
    path = result.output_dir / "pytorch_lora_weights.safetensors"
    saved = load_file(path)
    assert saved[f"unet.{module}.lora_A.weight"].shape[0] == 2
    assert saved["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape[0] == 4
    with safe_open(path, "pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert meta["unet.rank_pattern"] == {module: 2} and meta["unet.alpha_pattern"] == {module: 8.0}
    pipe = base_pipeline(tiny_sd)
    pipe.load_lora_weights(result.output_dir)
    config = next(iter(pipe.unet.peft_config.values()))
    assert config.rank_pattern.get(module) == 2 and config.alpha_pattern.get(module) == 8.0
