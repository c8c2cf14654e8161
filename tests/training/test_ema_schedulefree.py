"""EMA for every method and schedule-free AdamW: what evaluation and export see, and exact resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from difftune import load_config
from difftune.training import checkpointing
from difftune.training.finish import finish
from difftune.training.loop import train
from difftune.training.setup import setup
from difftune.training.step import train_step

ADAPTER = "pytorch_lora_weights.safetensors"


def _config(run_config, tiny_sd, data, out, method=None, **train_keys):
    return load_config(data=run_config(tiny_sd, data, out, method={"rank": 4, **(method or {})},
                                       train={"max_steps": 3, "learning_rate": 1e-2, **train_keys}))


def _trainable(run):
    return {n: p for n, p in run.model.components.denoiser.named_parameters() if p.requires_grad}


def test_evaluation_sees_ema_and_schedule_free_weights_and_training_resumes_unchanged(
        tmp_path, tiny_sd, shapes_data, run_config):
    run = setup(_config(run_config, tiny_sd, shapes_data, tmp_path / "a", {"ema": True, "ema_decay": 0.9},
                        optimizer="adamw_schedulefree", warmup_steps=1), log=lambda _m: None)
    assert type(run.optimizer.optimizer).__name__ == "AdamWScheduleFree"
    for _ in range(2):
        train_step(run)
    params = _trainable(run)
    training = {n: p.detach().clone() for n, p in params.items()}
    ema = dict(zip(run.model.method.ema.names, run.model.method.ema.model.shadow_params, strict=True))
    with run.evaluating():
        seen = {n: p.detach().clone() for n, p in params.items()}
    assert all(torch.equal(seen[n], ema[f"denoiser.{n}"]) for n in params)  # validation sees the EMA
    assert any(not torch.equal(seen[n], training[n]) for n in params)
    assert all(torch.equal(p, training[n]) for n, p in params.items())  # exactly back afterwards
    run.config.method.ema_validate = False
    with run.evaluating():
        x = {n: p.detach().clone() for n, p in params.items()}
    # Without the EMA, evaluation sees schedule-free's x (the average), not the training point y.
    assert any(not torch.equal(x[n], training[n]) for n in params)
    inner = run.optimizer.optimizer
    inner.eval()
    assert all(torch.equal(p, x[n]) for n, p in params.items())
    inner.train()


@pytest.mark.parametrize("export", [True, False])
def test_lora_ema_is_exported_by_choice(tmp_path, tiny_sd, shapes_data, run_config, export):
    plain = train(_config(run_config, tiny_sd, shapes_data, tmp_path / "plain"), log=lambda _m: None)
    ema = train(_config(run_config, tiny_sd, shapes_data, tmp_path / "ema",
                        {"ema": True, "ema_decay": 0.9, "ema_export": export}), log=lambda _m: None)
    a, b = load_file(plain.output_dir / ADAPTER), load_file(ema.output_dir / ADAPTER)
    same = [k for k in a if torch.equal(a[k], b[k])]
    if not export:
        assert len(same) == len(a)  # the EMA does not change training; the trained weights are exported
        return
    lora_b = [k for k in a if "lora_B" in k]
    assert lora_b and not any(k in same for k in lora_b)
    # B starts at zero: the average of its path lies nearer zero than where training ended.
    assert sum(b[k].abs().sum() for k in lora_b) < sum(a[k].abs().sum() for k in lora_b)


@pytest.mark.parametrize("method", [
    {"ema": True, "ema_decay": 0.9, "block_lr": {"up": 2.0, "down": 0.5}},
    {"type": "textual_inversion", "token": "<tok>", "initializer_token": "shape", "ema": True, "ema_decay": 0.8},
], ids=["lora-ema-block-lr", "textual-inversion-ema"])
def test_resume_is_exact_with_ema_schedule_free_and_block_rates(tmp_path, tiny_sd, shapes_data, run_config, method):
    keys = {"optimizer": "adamw_schedulefree", "warmup_steps": 2, "checkpoint_every": 2, "max_steps": 4}
    if method.get("type") == "textual_inversion":
        keys = {"max_steps": 4, "checkpoint_every": 2}
    # Validation every step: evaluating between steps must not change what training does.
    validation = {"prompts": ["a shape"], "steps": 1, "every": 1, "resolution": 32}

    def config(out, **extra):
        cfg = run_config(tiny_sd, shapes_data, out, method={"rank": 4, **method}, train={**keys, **extra},
                         validation=validation)
        if method.get("type") == "textual_inversion":
            cfg["method"].pop("rank", None)
        return load_config(data=cfg)

    train(config(tmp_path / "a"), log=lambda _m: None)
    out = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-2", out / "checkpoints" / "step-2")
    train(config(out, resume="latest"), log=lambda _m: None)
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert files
    for name in files:
        a, b = load_file(tmp_path / "a" / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bit-identical
    ckpt = load_file(tmp_path / "a" / "checkpoints" / "step-2" / "trainable.safetensors")
    assert any(k.startswith("ema/") for k in ckpt)


def test_schedule_free_export_is_its_evaluation_weights(tmp_path, tiny_sd, shapes_data, run_config):
    run = setup(_config(run_config, tiny_sd, shapes_data, tmp_path / "a", optimizer="adamw_schedulefree",
                        max_steps=2), log=lambda _m: None)
    while run.step < run.total_steps:
        train_step(run)
    with run.evaluating(purpose="export"):
        x = {n: p.detach().clone() for n, p in _trainable(run).items()}
    y = {n: p.detach().clone() for n, p in _trainable(run).items()}
    checkpointing.save(run)  # checkpoints hold the evaluation weights too; training goes on from train(x) ≈ y,
    # exactly where a run resumed from this checkpoint goes on from
    assert all(torch.allclose(p, y[n], atol=1e-6) for n, p in _trainable(run).items())
    in_checkpoint = list(load_file(tmp_path / "a" / "checkpoints" / "step-2" / "trainable.safetensors").values())
    assert all(any(torch.equal(v, c) for c in in_checkpoint) for n, v in x.items() if "lora_B" in n)
    finish(run)
    saved = load_file(tmp_path / "a" / ADAPTER)
    values = list(saved.values())
    lora_b_x = [v for n, v in x.items() if "lora_B" in n]

    def same(a, b):  # the export re-enters evaluation after the checkpoint: equal up to float rounding,
        return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-6)  # which varies with threads (x - y is ~1e-3)

    assert all(any(same(v, s) for s in values) for v in lora_b_x)
    assert not all(any(same(v, s) for s in values) for n, v in y.items() if "lora_B" in n)


def test_full_fine_tuning_checkpoints_with_the_older_ema_layout_resume_exactly(tmp_path, tiny_sd, shapes_data,
                                                                               run_config):
    """Older full fine-tuning checkpoints resume exactly: the EMA saved as ``ema.<role>.<i>`` and all
    parameters in one optimizer group (now one group per model part)."""
    import json

    from difftune.fileio import file_sha256, save_safetensors
    from difftune.training import checkpoint as ckpt

    def config(out, **extra):
        cfg = run_config(tiny_sd, shapes_data, out, method={"type": "full", "ema": True, "ema_decay": 0.9,
                                                            "train_text_encoder": True},
                         train={"max_steps": 4, "checkpoint_every": 2, "learning_rate": 1e-3, **extra})
        cfg["method"].pop("rank", None)
        return load_config(data=cfg)

    train(config(tmp_path / "a"), log=lambda _m: None)
    out = tmp_path / "b"
    folder = out / "checkpoints" / "step-2"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-2", folder)
    state = load_file(folder / "trainable.safetensors")
    run = setup(config(tmp_path / "probe"), log=lambda _m: None)
    legacy = {k: v for k, v in state.items() if not k.startswith("ema/")}
    for role, module in run.model.method.trainable_modules(run.model.components).items():
        for i, (name, _) in enumerate(module.named_parameters()):
            legacy[f"ema.{role}.{i}"] = state[f"ema/{role}.{name}"]
        legacy[f"ema.{role}.optimization_step"] = state["ema/optimization_step"].clone()
    assert len(legacy) > len(state) - 1  # one optimization_step per role instead of one in all
    save_safetensors(legacy, folder / "trainable.safetensors")
    blob = torch.load(folder / "training_state.pt", weights_only=False)
    groups = blob["optimizer"]["param_groups"]
    assert len(groups) == 2  # denoiser, text encoder
    merged = {k: v for k, v in groups[0].items() if k not in ("params", "name")}
    blob["optimizer"]["param_groups"] = [{**merged, "params": groups[0]["params"] + groups[1]["params"]}]
    for key in ("base_lrs", "_last_lr"):
        blob["scheduler"][key] = blob["scheduler"][key][:1]
    torch.save(blob, folder / "training_state.pt")
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    for name in ("trainable.safetensors", "training_state.pt"):
        manifest["files"][name] = file_sha256(folder / name)
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))

    messages = []
    train(config(out, resume="latest"), log=messages.append)
    assert any("optimizer state had 1 parameter group(s), this run has 2" in m for m in messages)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors")
                   if "checkpoints" not in p.parts)
    assert files
    for name in files:
        a, b = load_file(tmp_path / "a" / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bit-identical
