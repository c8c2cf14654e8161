"""Speed options must not change what is learned, and every run reports its speed and peak memory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from difftune import load_config
from difftune.training import precision
from difftune.training.loop import train

# Convolutions included, so channels-last reaches trained weights as well as frozen ones.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process; these tests switch it between runs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def _run(run_config, tiny_sd, data, out, log=None, **train_options):
    cfg = load_config(data=run_config(
        tiny_sd, data, out, method={"rank": 4, "targets": TARGETS},
        train={"max_steps": 20, "learning_rate": 1e-2, "log_every": 20, **train_options},
    ))
    result = train(cfg, log=log or (lambda _m: None))
    return result, load_file(out / "pytorch_lora_weights.safetensors")


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    flat_a = torch.cat([a[k].double().flatten() for k in sorted(a)])
    flat_b = torch.cat([b[k].double().flatten() for k in sorted(b)])
    return float((flat_a - flat_b).norm() / flat_a.norm())


@pytest.mark.slow
def test_speed_options_learn_what_the_defaults_learn(run_config, tiny_sd, shapes_data, tmp_path):
    from accelerate.state import AcceleratorState

    _, plain = _run(run_config, tiny_sd, shapes_data, tmp_path / "plain")
    _, nhwc = _run(run_config, tiny_sd, shapes_data, tmp_path / "nhwc", channels_last=True)
    _, foreach = _run(run_config, tiny_sd, shapes_data, tmp_path / "foreach", fused_optimizer=False)
    AcceleratorState._reset_state()
    _, bf16 = _run(run_config, tiny_sd, shapes_data, tmp_path / "bf16", mixed_precision="bf16")
    # channels-last: the same fp32 maths in another memory layout, only the order of the
    # convolutions' sums changes. foreach against the default fused AdamW: the same update, rounded
    # differently. Tolerance for both: an order of magnitude below what bf16 autocast alone does to
    # the same 20-step run (the noise the project accepts), and below 1e-3 in absolute terms.
    bf16_noise = _relative_difference(plain, bf16)
    for option, weights in {"channels_last": nhwc, "fused_optimizer": foreach}.items():
        difference = _relative_difference(plain, weights)
        assert difference < 1e-3, option
        assert difference < 0.1 * bf16_noise, option
        assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k), option


def test_adamw_is_fused_where_torch_has_the_kernel():
    from difftune.config.schema import TrainConfig
    from difftune.training.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    fused = build_optimizer([{"params": params}], TrainConfig(), torch.device("cpu"))
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    plain = build_optimizer([{"params": params}], TrainConfig(fused_optimizer=False), torch.device("cpu"))
    assert plain.defaults["foreach"] and not plain.defaults["fused"]
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]  # no fused kernel there: foreach instead
    assert build_optimizer([{"params": meta}], TrainConfig(), torch.device("meta")).defaults["foreach"]


def test_compile_wraps_only_the_training_forward(run_config, tiny_sd, shapes_data, tmp_path, monkeypatch):
    """The wiring, with torch.compile replaced (compiling is CUDA-only, and slow)."""
    calls = []

    def fake_compile(module, mode=None, **_kwargs):
        calls.append((type(module).__name__, mode))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    logs = []
    cfg = load_config(data=run_config(
        tiny_sd, shapes_data, tmp_path / "out",
        train={"max_steps": 2, "compile": True, "compile_mode": "max-autotune-no-cudagraphs"},
    ))
    # The CPU refusal (tested below) is lifted here to reach the wiring behind it.
    import difftune.training.accelerator as accelerator

    real_make = accelerator.make_accelerator
    monkeypatch.setattr("difftune.training.setup.make_accelerator",
                        lambda c, p: real_make(_without_compile(c), p))
    result = train(cfg, log=logs.append)
    assert calls == [("UNet2DConditionModel", "max-autotune-no-cudagraphs")]
    assert any("torch.compile (max-autotune-no-cudagraphs)" in m for m in logs)
    assert "compile_seconds_estimate" in result.performance
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def _without_compile(config):
    import dataclasses

    return dataclasses.replace(config, train=dataclasses.replace(config.train, compile=False))


def test_compile_is_refused_on_cpu_before_weights_load(run_config, tiny_sd, shapes_data, tmp_path, monkeypatch):
    from difftune.errors import DifftuneError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "out", train={"compile": True}))
    with pytest.raises(DifftuneError, match=r"train\.compile: .*wrong LoRA gradients.*set train\.compile = false"):
        train(cfg, log=lambda _m: None)


def test_a_run_reports_step_time_and_peak_memory(run_config, tiny_sd, shapes_data, tmp_path):
    logs = []
    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "out", train={"max_steps": 3}))
    result = train(cfg, log=logs.append)
    report = json.loads((tmp_path / "out" / "logs" / "performance.json").read_text())
    assert report["steps"] == 3
    assert report["peak_memory_kind"] == ("CUDA allocated" if torch.cuda.is_available() else "process RSS")
    assert report["peak_memory_bytes"] > 50 * 2**20  # a Python process with torch loaded is larger than this
    assert report["median_step_seconds"] > 0
    assert result.performance == report
    line = next(m for m in logs if m.startswith("performance: "))
    assert "median step" in line and "GiB" in line
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Peak memory" in card and "s per step" in card


def test_auto_mixed_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_mixed_precision("auto", cuda=False) == "bf16"
    assert precision.resolve_mixed_precision("no", cuda=False) == "no"
    assert precision.resolve_mixed_precision("auto", model_dtype="fp16", cuda=False) == "no"
    # a small denoiser (work = parameters x latent positions below the threshold) keeps fp32 even here:
    # casting to bf16 costs more than its faster products save (docs/performance.md, "Precision")
    small, large = precision.BF16_MIN_CPU_WORK / 2, precision.BF16_MIN_CPU_WORK * 2
    assert precision.resolve_mixed_precision("auto", cuda=False, cpu_work=small) == "no"
    assert precision.resolve_mixed_precision("auto", cuda=False, cpu_work=large) == "bf16"
    assert precision.resolve_mixed_precision("auto", model_dtype="bf16", cuda=False, cpu_work=small) == "bf16"
    assert precision.resolve_mixed_precision("bf16", cuda=False, cpu_work=small) == "bf16"  # asked for: kept
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_mixed_precision("auto", cuda=False) == "no"
    assert precision.resolve_mixed_precision("auto", cuda=False, cpu_work=large) == "no"
    assert precision.resolve_mixed_precision("bf16", cuda=False) == "bf16"
    cfg = load_config(data={"model": {"path": "m"}, "data": {"path": "d"}}, check_paths=False)
    assert cfg.train.mixed_precision == "auto"


def test_auto_mixed_precision_reads_the_denoisers_size_from_its_files(tiny_sd, tmp_path, monkeypatch):
    """``auto`` on a native-bf16 CPU: the denoiser's parameters come from the safetensors headers of a local
    folder or single file (nothing loaded), times the latent positions; a Hub id cannot be counted offline
    and is taken as large."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from difftune.config.schema import ModelConfig

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    params = sum(p.numel() for p in unet.parameters())
    work = precision.denoiser_work(ModelConfig(path=str(tiny_sd)), 64)
    assert work == params * (64 / 8) ** 2
    assert precision.denoiser_work(ModelConfig(path=str(tiny_sd)), [32, 128]) == params * (128 / 8) ** 2
    # a weight variant counts its own files only, not the plain ones beside them
    variant = tmp_path / "variant"
    shutil.copytree(tiny_sd, variant)
    save_file({"w": torch.zeros(3, 5)}, variant / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert precision.denoiser_work(ModelConfig(path=str(variant), variant="fp16"), 8) == 15
    assert precision.denoiser_work(ModelConfig(path=str(variant)), 8) == params
    # a file that is not safetensors inside is not counted (loading says what is wrong with it)
    (variant / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not a safetensors file")
    assert precision.denoiser_work(ModelConfig(path=str(variant), variant="fp16"), 8) is None
    single = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.zeros(10)}, single)
    family, source = precision_family(single)
    assert family.denoiser_parameters(source) == 26
    hub = ModelConfig(path="someone/some-model", family="sd1")
    assert precision.denoiser_work(hub, 512) is None
    assert precision.resolve_mixed_precision("auto", cuda=False, cpu_work=None) == "bf16"
    # end to end: the tiny model trains in fp32 under auto, unless the threshold says it is large enough
    cfg = load_config(data={"model": {"path": str(tiny_sd)}, "data": {"path": "d", "resolution": 64}},
                      check_paths=False)
    assert precision.mixed_precision(cfg) == "no"
    assert precision.weight_dtype(cfg) == torch.float32
    monkeypatch.setattr(precision, "BF16_MIN_CPU_WORK", work)
    assert precision.mixed_precision(cfg) == "bf16"
    assert precision.weight_dtype(cfg) == torch.bfloat16


def precision_family(path):
    from difftune.models import get_family
    from difftune.models.base import ModelSource

    return get_family("sd1"), ModelSource(path=str(path), kind="single_file")


def test_auto_mixed_precision_is_written_to_the_model_card(run_config, tiny_sd, shapes_data, tmp_path):
    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "out",
                                      train={"max_steps": 1, "mixed_precision": "auto"}))
    logs = []
    train(cfg, log=logs.append)
    expected = precision.mixed_precision(cfg)
    assert any(f"mixed precision {expected}" in m for m in logs)
    assert f"{expected} (auto" in (tmp_path / "out" / "README.md").read_text()


def test_auto_says_why_it_kept_fp32_for_a_small_denoiser(run_config, tiny_sd, shapes_data, tmp_path, monkeypatch):
    """On a CPU with native bf16 a user who sees fp32 chosen is told why, in the log and the model card."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "out",
                                      train={"max_steps": 1, "mixed_precision": "auto"}))
    logs = []
    train(cfg, log=logs.append)
    why = "no (auto: fp32 is faster than bf16 for a denoiser this small on the CPU)"
    assert any(m.strip() == f"precision: mixed {why}" for m in "\n".join(logs).splitlines()), logs
    assert why in (tmp_path / "out" / "README.md").read_text()
    asked = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "out2", train={"mixed_precision": "bf16"}))
    assert precision.precision_label(asked) == "bf16"  # asked for: no reason to give
    monkeypatch.setattr(precision, "BF16_MIN_CPU_WORK", 1.0)  # as if it were large
    assert precision.precision_label(cfg) == "bf16 (auto)"


@pytest.mark.parametrize(("native", "asked", "warned"), [(False, "bf16", True), (True, "bf16", False),
                                                     (False, "auto", False), (False, "no", False)])
def test_bf16_asked_on_a_cpu_that_emulates_it_is_warned_about_and_kept(
        run_config, tiny_sd, shapes_data, tmp_path, monkeypatch, native, asked, warned):
    """On a CPU without avx512_bf16/amx_bf16 an explicit bf16 run is many times slower than fp32: the
    run says so at its start, and still runs as asked (never quietly as something else)."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    cfg = load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "out",
                                      train={"max_steps": 1, "mixed_precision": asked}))
    logs = []
    train(cfg, log=logs.append)
    warnings = [m for m in logs if "without native bf16" in m]
    assert len(warnings) == warned, logs
    if warned:
        assert 'train.mixed_precision = "auto"' in warnings[0] and "emulates" in warnings[0]
    expected = "bf16" if asked == "bf16" or native else "no"
    assert any(f"mixed precision {expected}" in m for m in logs)


def _scalar_reads_outside_the_optimizer(run_config, tiny_sd, data, out, steps: int) -> int:
    """Host reads of tensor values (``.item()``, ``float(t)``, ``if t:``) during a run, optimizer excluded.

    torch's foreach AdamW reads its step counters, which live on the host even with CUDA
    parameters; any other read inside the step would be a host-device synchronisation on a GPU.
    """
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    reads = []

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                files = [f.filename for f in traceback.extract_stack()]
                if not any("torch/optim/" in f for f in files):
                    reads.append(files[-4:])
            return func(*args, **(kwargs or {}))

    cfg = load_config(data=run_config(tiny_sd, data, out, train={"max_steps": steps, "log_every": steps}))
    with CountReads():
        train(cfg, log=lambda _m: None)
    return len(reads)


def test_training_steps_do_not_read_values_back_except_to_log(run_config, tiny_sd, shapes_data, tmp_path):
    short = _scalar_reads_outside_the_optimizer(run_config, tiny_sd, shapes_data, tmp_path / "short", 2)
    long = _scalar_reads_outside_the_optimizer(run_config, tiny_sd, shapes_data, tmp_path / "long", 5)
    assert long == short  # three more steps, not one more read: only the single log step reads the loss
