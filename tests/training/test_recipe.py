"""The classic LoRA recipe's parts: frozen weights and dtypes, schedules, scale_lr, epochs, optimizers."""

from __future__ import annotations

import pytest
import torch

from difftune import load_config
from difftune.config.schema import TrainConfig
from difftune.errors import DifftuneError
from difftune.training.optim import build_optimizer, build_scheduler, learning_rate, total_steps
from difftune.training.precision import weight_dtype


def _lrs(name: str, **kw) -> list[float]:
    cfg = TrainConfig(learning_rate=1.0, lr_scheduler=name, warmup_steps=2, **kw)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, total_steps=10)
    out = []
    for _ in range(10):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_learning_rate_schedules():
    assert _lrs("constant") == [1.0] * 10
    assert _lrs("constant_with_warmup")[:3] == [0.0, 0.5, 1.0]
    linear = _lrs("linear")
    assert linear[:3] == [0.0, 0.5, 1.0] and linear[-1] == pytest.approx(0.125)
    cosine = _lrs("cosine")
    assert cosine[2] == 1.0 and cosine[6] == pytest.approx(0.5) and cosine[-1] < 0.05
    restarts = _lrs("cosine_with_restarts", lr_cycles=2)
    assert restarts[6] > restarts[5]  # the second cycle starts again from the top
    poly = _lrs("polynomial", lr_power=2.0)
    assert poly[3] > poly[4] > poly[-1]


def test_scale_lr_and_steps_from_epochs(tmp_path, tiny_sd, shapes_data, run_config):
    raw = run_config(tiny_sd, shapes_data, tmp_path, train={
        "learning_rate": 1e-4, "scale_lr": True, "batch_size": 2, "gradient_accumulation": 3, "epochs": 4})
    del raw["train"]["max_steps"]  # unset: derived from epochs
    cfg = load_config(data=raw)
    assert learning_rate(cfg.train, num_processes=2) == pytest.approx(1e-4 * 2 * 3 * 2)
    # 4 images / batch 2 = 2 micro-batches per epoch -> ceil(2 / 3) = 1 step per epoch.
    assert total_steps(cfg.train, batches_per_epoch=2) == 4
    assert total_steps(cfg.train, batches_per_epoch=7) == 4 * 3


def test_frozen_parts_are_frozen_in_low_precision_and_lora_stays_fp32(tiny_sd, shapes_data, tmp_path, run_config):
    from difftune.methods import METHODS
    from difftune.models import detect_family, get_family
    from difftune.models.loading import resolve_source

    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path, method={"train_text_encoder": True},
                                      train={"mixed_precision": "bf16"}))
    source = resolve_source(str(tiny_sd))
    family = get_family(detect_family(source), cfg.model, cfg.train)
    components = family.load(source, dtype=weight_dtype(cfg))
    method = METHODS.get("lora").build(cfg.method, family)
    method.prepare(components)
    assert not any(p.requires_grad for p in components.vae.parameters())
    assert components.vae.dtype == torch.bfloat16
    for module in (components.denoiser, components.text_encoders[0]):
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        frozen = [p for n, p in module.named_parameters() if not p.requires_grad]
        assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable)
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


def test_v_prediction_model_is_detected_from_its_scheduler(tiny_sd_v):
    from difftune.models import detect_family, get_family
    from difftune.models.loading import resolve_source
    from difftune.objectives import OBJECTIVES

    source = resolve_source(str(tiny_sd_v))
    family = get_family(detect_family(source))
    components = family.load(source, dtype=torch.float32)
    objective = OBJECTIVES.get(family.objective)(family.objective_settings(components), TrainConfig())
    assert objective.prediction_type == "v_prediction"


def test_optional_optimizers_fail_with_a_clear_message():
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))]}]
    with pytest.raises(DifftuneError, match="adamw8bit .* needs a CUDA GPU"):
        build_optimizer(params, TrainConfig(optimizer="adamw8bit"), torch.device("cpu"))
    try:
        import prodigyopt  # noqa: F401
    except ImportError:
        with pytest.raises(DifftuneError, match=r"pip install 'difftune\[prodigy\]'"):
            build_optimizer(params, TrainConfig(optimizer="prodigy"), torch.device("cpu"))
    opt = build_optimizer(params, TrainConfig(adam_beta1=0.8, adam_beta2=0.9, weight_decay=0.1, adam_epsilon=1e-6),
                          torch.device("cpu"))
    group = opt.param_groups[0]
    assert group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.1 and group["eps"] == 1e-6


def test_fp16_on_cpu_is_refused_with_advice(tmp_path, tiny_sd, shapes_data, run_config):
    from difftune.training.loop import train

    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path, train={"mixed_precision": "fp16"}))
    with pytest.raises(DifftuneError, match="fp16 needs a CUDA GPU"):
        train(cfg)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_update(tmp_path, tiny_sd, shapes_data, run_config):
    from safetensors.torch import load_file

    from difftune.training.loop import train

    outs = []
    for flag in (False, True):
        out = tmp_path / str(flag)
        train(load_config(data=run_config(tiny_sd, shapes_data, out, train={
            "max_steps": 2, "gradient_checkpointing": flag})))
        outs.append(load_file(out / "pytorch_lora_weights.safetensors"))
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], atol=1e-6, rtol=1e-5)


def test_progress_bar_shows_loss_learning_rate_speed_and_time_left(tmp_path, tiny_sd, shapes_data, run_config,
                                                                    capsys):
    from difftune.training.loop import train

    train(load_config(data=run_config(tiny_sd, shapes_data, tmp_path, train={"max_steps": 3, "log_every": 1})))
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    last = [line for line in bar if line.startswith("train:") and "3/3" in line][-1]
    assert "loss=" in last and "lr=" in last
    assert "step/s" in last or "s/step" in last  # speed
    assert "<00:00" in last  # elapsed<remaining


def test_a_text_encoder_lora_from_a_local_folder_saves_without_peft_guessing_the_vocabulary(
        tiny_sd, shapes_data, tmp_path, run_config):
    """peft's "auto" embedding check warned on every export from a local diffusers folder."""
    import warnings

    from difftune.methods import METHODS
    from difftune.models import detect_family, get_family
    from difftune.models.loading import resolve_source

    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path, method={"train_text_encoder": True}))
    source = resolve_source(str(tiny_sd))
    family = get_family(detect_family(source), cfg.model, cfg.train)
    components = family.load(source, dtype=torch.float32)
    method = METHODS.get("lora").build(cfg.method, family)
    method.prepare(components)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers = method.lora_layers(components)
    assert set(layers) == {"unet", "text_encoder"}
    assert all("lora_" in k for state, _ in layers.values() for k in state)
