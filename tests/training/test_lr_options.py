"""Learning-rate options change the learning rate of exactly the parameters they name, and so their training."""

from __future__ import annotations

import pytest
import torch

from difftune import load_config
from difftune.errors import ConfigError
from difftune.training.setup import setup
from difftune.training.step import train_step


def _run(tmp_path, tiny_sd, shapes_data, run_config, **method):
    raw = run_config(tiny_sd, shapes_data, tmp_path / "out", method={"rank": 4, "init": "gaussian", **method},
                     train={"max_steps": 1, "learning_rate": 1e-3, "weight_decay": 0.0})
    return setup(load_config(data=raw), log=lambda _m: None)


def _named(run, role="denoiser"):
    return dict(run.model.components.denoiser.named_parameters() if role == "denoiser"
                else run.model.components.text_encoders[0].named_parameters())


def test_block_lr_lora_plus_and_text_encoder_rate_reach_the_optimizer_and_the_weights(
        tmp_path, tiny_sd, shapes_data, run_config):
    run = _run(tmp_path, tiny_sd, shapes_data, run_config, block_lr={"down": 0.0, "up.1": 2.0},
               lora_plus_ratio=4.0, train_text_encoder=True, text_encoder_learning_rate=5e-4)
    groups = {g["name"]: g for g in run.optimizer.param_groups}
    assert {name: g["lr"] for name, g in groups.items()} == pytest.approx({
        "denoiser down": 0.0, "denoiser down lora_B": 0.0, "denoiser": 1e-3, "denoiser lora_B": 4e-3,
        "denoiser up.1": 2e-3, "denoiser up.1 lora_B": 8e-3, "text_encoder": 5e-4, "text_encoder lora_B": 2e-3,
    })
    named = _named(run)
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert all(id(p) in ids["denoiser up.1 lora_B"] for n, p in named.items()
               if n.startswith("up_blocks.1.") and "lora_B" in n and p.requires_grad)
    assert all(id(p) in ids["denoiser down"] for n, p in named.items()
               if n.startswith("down_blocks.") and "lora_A" in n)
    before = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    train_step(run)
    moved = {n for n, p in named.items() if p.requires_grad and not torch.equal(p, before[n])}
    assert moved and not any(n.startswith("down_blocks.") for n in moved)  # multiplier 0: the block stays put
    assert any(n.startswith("up_blocks.") for n in moved)


def test_a_block_that_matches_nothing_stops_the_run(tmp_path, tiny_sd, shapes_data, run_config):
    with pytest.raises(ConfigError, match=r"method.block_lr.up.7: matches no trained parameter of the unet; "
                                          r"its trained blocks are: down.0, mid, up.1"):
        _run(tmp_path, tiny_sd, shapes_data, run_config, block_lr={"up.7": 2.0})


@pytest.mark.parametrize(("method", "message"), [
    ({"type": "full", "rank": 8}, r'method.rank: does not apply to method.type = .full. \(it is for "lora" and '
                                  r'"pivotal"\).*The \[method\] keys of .full.: ema, .*save_single_file'),
    ({"type": "full", "lora_plus_ratio": 16.0}, "method.lora_plus_ratio: does not apply to method.type = 'full'"),
    ({"variant": "loha", "lora_plus_ratio": 16.0}, "method.lora_plus_ratio: only applies with method.variant"),
    ({"text_encoder_learning_rate": 1e-5}, "method.text_encoder_learning_rate: only applies with "
                                           "method.train_text_encoder = true"),
    ({"ema_decay": 0.9}, "method.ema_decay: only applies with method.ema = true"),
    ({"block_lr": {"middle": 2.0}}, "method.block_lr.middle: not a block"),
])
def test_keys_that_do_not_apply_are_refused(tmp_path, tiny_sd, shapes_data, run_config, method, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data=run_config(tiny_sd, shapes_data, tmp_path, method=method))


def test_refused_key_exits_2_from_the_cli(tmp_path, tiny_sd, shapes_data, run_config):
    import subprocess
    import sys

    from difftune.config.loader import dump_toml

    raw = run_config(tiny_sd, shapes_data, tmp_path / "out", method={"type": "textual_inversion", "rank": 8,
                                                                    "token": ["<t>"], "initializer_token": ["dog"]})
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(raw))
    out = subprocess.run([sys.executable, "-m", "difftune", "validate", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "method.rank: does not apply to method.type = 'textual_inversion'" in out.stderr
    assert "token, initializer_token, num_vectors, templates" in out.stderr


def test_transformer_block_ranges_pick_the_most_specific_key():
    from torch import nn

    from difftune.methods.lr_groups import lr_groups
    from difftune.models import get_family

    flux = get_family("flux")
    cfg = load_config(data={"model": {"path": "m"}, "data": {"path": "d"},
                            "method": {"block_lr": {"0-9": 0.5, "3": 3.0, "single.0-37": 2.0}}},
                      check_paths=False).method
    names = ["transformer_blocks.2.attn.to_q.lora_A.default.weight", "transformer_blocks.3.attn.to_q.lora_A.default.weight",
             "transformer_blocks.12.attn.to_q.lora_A.default.weight", "single_transformer_blocks.5.attn.to_q.lora_A.w",
             "x_embedder.lora_A.default.weight"]
    params = [nn.Parameter(torch.zeros(1)) for _ in names]
    groups = lr_groups([("denoiser", n, p) for n, p in zip(names, params, strict=True)], 1.0, cfg, flux)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert [lr_of[id(p)] for p in params] == [0.5, 3.0, 1.0, 2.0, 1.0]
    with pytest.raises(ConfigError, match=r"method.block_lr.up: matches no trained parameter of the transformer; "
                                          r"its trained blocks are: 2, 3"):
        cfg.block_lr = {"up": 2.0}
        lr_groups([("denoiser", n, p) for n, p in zip(names[:2], params[:2], strict=True)], 1.0, cfg, flux)


def test_objective_keys_are_refused_by_validate_when_the_model_folder_says_the_family(tmp_path, shapes_data):
    import json

    from difftune.models import FAMILIES, FAMILY_OBJECTIVES, PIPELINE_OBJECTIVES

    for name in FAMILIES.names():  # the torch-free tables agree with the families themselves
        family = FAMILIES.get(name)
        assert FAMILY_OBJECTIVES[name] == family.objective
        assert all(PIPELINE_OBJECTIVES[p] == family.objective for p in family.pipeline_class_names)
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    raw = {"model": {"path": str(folder)}, "data": {"path": str(shapes_data)}, "train": {"snr_gamma": 5.0}}
    with pytest.raises(ConfigError, match=r"train.snr_gamma: does not apply to .*flux \(a FluxPipeline\), which trains "
                                          r"with flow match.*train.weighting_scheme"):
        load_config(data=raw, check_paths=False)
    raw["model"] = {"path": "some/hub-id", "family": "sdxl"}
    raw["train"] = {"weighting_scheme": "logit_normal"}
    with pytest.raises(ConfigError, match="train.weighting_scheme: does not apply to model.family = 'sdxl'"):
        load_config(data=raw, check_paths=False)
