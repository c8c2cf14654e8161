"""Quantised frozen bases (``model.quantize``, ``model.quantize_text_encoders``) and streamed loading."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from difftune import load_config, tiny
from difftune.errors import ConfigError, DifftuneError
from difftune.models import FAMILIES, get_family
from difftune.models.loading import resolve_source
from difftune.models.quantize import MODES, backend_for
from difftune.tensors import is_quantized, module_bytes

BUILDERS = {"sd1": tiny.build_tiny_sd, "sdxl": tiny.build_tiny_sdxl, "sd3": tiny.build_tiny_sd3,
            "flux": tiny.build_tiny_flux}
#: One mode per family, so every mode is loaded by some family.
MODE_OF = {"sd1": "int8", "sd2": "fp8", "sdxl": "nf4", "sd3": "int4", "flux": "int8"}


def _config(model, data, **model_keys):
    return load_config(data={"model": {"path": str(model), **model_keys}, "data": {"path": str(data)}})


def _linears(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process; a test here trains in bf16."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return tiny.build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.mark.parametrize("name", FAMILIES.names())
def test_quantised_bases_load_for_every_family(name, tmp_path):
    """Denoiser and text encoders load with every linear weight quantised, smaller, and predict like the original."""
    builder = BUILDERS.get(name, tiny.build_tiny_sd)
    folder = builder(tmp_path / name)
    mode = MODE_OF[name]
    plain = get_family(name, _config(folder, tmp_path).model).load(resolve_source(str(folder)), dtype=torch.float32)
    family = get_family(name, _config(folder, tmp_path, quantize=mode, quantize_text_encoders=mode).model)
    quant = family.load(resolve_source(str(folder)), dtype=torch.float32)

    for module in (quant.denoiser, *quant.text_encoders):
        linears = _linears(module)
        assert linears and all(is_quantized(m.weight) for m in linears), type(module).__name__
    def linear_bytes(module):
        return sum(module_bytes(m) for m in _linears(module))

    assert linear_bytes(quant.denoiser) < 0.6 * linear_bytes(plain.denoiser)  # fp32 → 8 or 4 bits, plus scales
    with torch.no_grad():
        cond = family.encode_prompt(quant, ["a red circle"])
        ref = family.encode_prompt(plain, ["a red circle"])
    for key, value in cond.items():
        err = (value - ref[key]).norm() / ref[key].norm()
        assert torch.isfinite(value).all() and err < 0.25, (key, err)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "none"])
def test_lora_gradients_reach_only_the_adapter(mode, tiny_flux, tmp_path):
    """Under bf16 autocast the loss reaches every LoRA matrix; no quantised or frozen weight gets a gradient."""
    from difftune.methods import METHODS

    config = _config(tiny_flux, tmp_path, quantize=mode)
    family = get_family("flux", config.model)
    components = family.load(resolve_source(str(tiny_flux)), dtype=torch.bfloat16)
    torch.manual_seed(0)
    METHODS.get("lora").build(config.method, family).prepare(components)
    with torch.no_grad():  # B ≠ 0, so the A matrices get gradients at the first step too
        for name, p in components.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    with torch.no_grad():
        cond = family.encode_prompt(components, ["a red circle"])
    latents = torch.randn(1, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = family.predict(components, components.denoiser, latents, torch.tensor([500.0]), cond, {})
    pred.float().pow(2).mean().backward()
    named = dict(components.denoiser.named_parameters())
    lora = {n: p for n, p in named.items() if "lora_" in n}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for n, p in named.items() if n not in lora)
    assert sum(is_quantized(p) for p in named.values()) >= len(lora) // 2  # every targeted layer is quantised


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_a_quantised_linear_keeps_no_full_precision_copy_of_its_weight_for_backward(mode):
    """torchao's own weight-only linear saves ``W.to(x.dtype)`` for the input's gradient: with gradient
    checkpointing that is a bf16 copy of every layer of the block being recomputed (0.7 GB per Flux block)."""
    from difftune.models.quantize import quantize_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512).to(torch.bfloat16).requires_grad_(False)
    quantized = quantize_linear(linear, mode, backend_for(mode))
    reference = quantized.weight.dequantize(torch.float32)  # what the quantised layer stands for
    x = torch.randn(3, 256, requires_grad=True)
    saved = []
    with (torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
          torch.autocast("cpu", dtype=torch.bfloat16)):
        y = quantized(x)
    assert y.dtype == torch.bfloat16  # like a bf16 nn.Linear under autocast
    assert not [t for t in saved if not is_quantized(t) and t.numel() >= reference.numel()]
    y.float().sum().backward()
    expected = torch.ones(3, 512) @ reference
    torch.testing.assert_close(x.grad, expected, rtol=0.02, atol=0.02 * expected.abs().max().item())


def test_trained_on_int8_base_the_export_loads_against_the_unquantised_base(tiny_flux, tmp_path, shapes_data,
                                                                            run_config):
    """A LoRA trained on an int8 base is a normal adapter: diffusers loads it into the bf16/fp32 base, every key matched."""
    from diffusers import FluxPipeline
    from safetensors import safe_open

    from difftune.training.loop import train

    out = tmp_path / "run"
    cfg = load_config(data=run_config(tiny_flux, shapes_data, out, model={"quantize": "int8",
                                                                          "quantize_text_encoders": "int8"},
                                      train={"max_steps": 2, "learning_rate": 1e-2, "mixed_precision": "bf16"},
                                      data={"cache_latents": True, "cache_text": True}))
    logs: list[str] = []
    result = train(cfg, log=logs.append)
    perf = json.loads((out / "logs" / "performance.json").read_text())
    parts = perf["peak_memory_breakdown_bytes"]
    assert set(parts) == {"weights", "trainable", "optimizer", "activations_and_other"}
    # AdamW keeps two moments per trainable value (plus a step count per tensor); trainable counts values + grads.
    assert 0 < parts["trainable"] <= parts["optimizer"] < 1.1 * parts["trainable"]
    assert perf["load_peak_memory_bytes"] > 0 and any("load peak" in line for line in logs)
    assert any(line.startswith("quantised: denoiser int8 (torchao") and "text encoders int8" in line for line in logs)
    (adapter,) = [f for f in result.files if f.name == "pytorch_lora_weights.safetensors"]
    with safe_open(str(adapter), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys)
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipe.load_lora_weights(out)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    # diffusers warns about keys it could not place; the only message allowed says the file has no CLIP keys.
    problems = [m for m in messages if ("lora" in m.lower() or "key" in m.lower())
                and not m.startswith("No LoRA keys associated to CLIPTextModel")]
    assert not problems, problems
    loaded = {n for n, _ in pipe.transformer.named_modules() if n.endswith("lora_A.default_0")}
    assert len(loaded) == sum(1 for k in keys if k.endswith("lora_A.weight"))


STREAM_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from difftune.models.quantize import backend_for
    from difftune.tensors import module_bytes
    from difftune.models.streaming import load_streamed
    from difftune.training.memory import host_peak_bytes, host_rss_bytes, reset_host_peak
    from diffusers import FluxTransformer2DModel
    folder = Path(sys.argv[1])
    FluxTransformer2DModel.load_config(folder)
    backend_for("int8").quantize_linear(torch.nn.Linear(64, 64), "int8")  # lazy imports done before measuring
    assert reset_host_peak()
    before = host_rss_bytes()
    model = load_streamed(FluxTransformer2DModel, folder, torch.bfloat16, "int8", backend_for("int8"))
    print(json.dumps({"peak": host_peak_bytes() - before, "model": module_bytes(model)}))
""")


def test_streamed_loading_never_holds_two_unquantised_copies(tmp_path):
    """Measured in a fresh process: a streamed int8 load of an fp32 file peaks below one bf16 copy of the model.

    Loading the usual way holds the whole bf16 model before it could be quantised (and, converting
    from fp32, the file's tensors too); streamed, the peak is the int8 model plus a few tensors.
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    # Big enough that one bf16 copy (~200 MB) dwarfs the loader's fixed overhead (a few tensors, 16 MiB
    # between heap trims).
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=4, num_single_layers=16,
                                   attention_head_dim=64, num_attention_heads=8, joint_attention_dim=256,
                                   pooled_projection_dim=64, axes_dims_rope=(8, 28, 28))
    bf16_copy = sum(p.numel() * 2 for p in model.parameters())
    model.save_pretrained(tmp_path / "t", max_shard_size="100MB")  # several shards, fp32 on disk
    del model
    assert len(list((tmp_path / "t").glob("*.safetensors"))) > 2 and bf16_copy > 150 * 2**20

    out = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(tmp_path / "t")], capture_output=True,
                         text=True, check=True)
    streamed = json.loads(out.stdout.strip().splitlines()[-1])
    assert streamed["model"] < 0.6 * bf16_copy  # int8 linear weights; norms and biases stay bf16
    assert streamed["peak"] < streamed["model"] + 0.5 * bf16_copy, (streamed, bf16_copy)


def test_quantize_needs_the_library_and_names_the_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(DifftuneError, match=r'model.quantize = "int8": torchao is not installed.*difftune\[quantize\]'):
        backend_for("int8")
    assert backend_for("int4").name == "optimum-quanto"


def test_bitsandbytes_is_used_on_cuda_when_installed(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.49.0"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    assert backend_for("nf4", cuda=True).name == "bitsandbytes"
    assert backend_for("fp8", cuda=True).name == "torchao"  # bitsandbytes has no fp8 weights
    assert backend_for("nf4", cuda=False).name == "torchao"


@pytest.mark.parametrize(("keys", "message"), [
    ({"model": {"quantize": "int8"}, "method": {"type": "full"}}, "model.quantize"),
    ({"model": {"quantize_text_encoders": "nf4"}, "method": {"train_text_encoder": True}},
     "model.quantize_text_encoders"),
    ({"model": {"quantize": "int3"}}, "model.quantize: 'int3' is not one of"),
    ({"model": {"quantize": "nf4"}, "method": {"variant": "dora"}}, 'model.quantize: "nf4" with method.variant = "dora"'),
    ({"model": {"quantize": "int4"}, "method": {"variant": "dora"}}, 'model.quantize: "int4" with method.variant = "dora"'),
])
def test_quantize_settings_that_cannot_work_are_refused(keys, message, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")  # looks like a model folder; holds no weights
    data = {"model": {"path": str(tmp_path)}, "data": {"path": str(tmp_path)}}
    for section, values in keys.items():
        data.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        load_config(data=data)


def test_with_every_input_cached_the_encoders_are_gone_before_the_denoiser_loads(tiny_flux, tmp_path, shapes_data,
                                                                                  run_config, monkeypatch):
    """Loaded (quantised), used for the caches, released — and freed — before the denoiser is read."""
    import gc
    import weakref

    from difftune.models.flux import Flux
    from difftune.training import loop, setup

    encoders: list[weakref.ref] = []
    order: list[str] = []
    real_release, real_load = setup.release_if_cached, Flux.load

    def release(config, components):
        if components.vae is None:  # the second call, after the denoiser is loaded: nothing left to release
            return real_release(config, components)
        encoders.extend(weakref.ref(m) for m in (components.vae, *components.text_encoders))
        assert all(is_quantized(m.weight) for e in components.text_encoders for m in _linears(e))
        return real_release(config, components)

    def load(self, source, *, dtype, which="all"):
        order.append(which)
        if which == "denoiser":
            gc.collect()
            assert encoders and not [ref() for ref in encoders if ref() is not None]
        return real_load(self, source, dtype=dtype, which=which)

    monkeypatch.setattr(setup, "release_if_cached", release)
    monkeypatch.setattr(Flux, "load", load)
    cfg = load_config(data=run_config(tiny_flux, shapes_data, tmp_path / "run", model={"quantize_text_encoders": "int8"},
                                      train={"max_steps": 1}, data={"cache_latents": True, "cache_text": True}))
    loop.train(cfg, log=lambda *_: None)
    assert order == ["frozen", "denoiser"]
