"""Merging adapters: exact by concatenated ranks, reduced by SVD with the error reported, fused."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from adapter_helpers import pipeline, run
from difftune.adapters.convert import read_adapter
from difftune.cli import main


def test_exact_merge_equals_weighted_sum(lora_a, lora_b, tmp_path):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", f"{lora_a}:0.7", f"{lora_b}:-0.5", "-o", str(out)]) == 0
    a, b, merged = read_adapter(lora_a), read_adapter(lora_b), read_adapter(out)
    assert set(merged.modules) == set(a.modules) | set(b.modules)
    for name, m in merged.modules.items():
        expected = torch.zeros_like(m.delta())
        if name in a.modules:
            expected += 0.7 * a.modules[name].delta()
        if name in b.modules:
            expected -= 0.5 * b.modules[name].delta()
        assert torch.allclose(m.delta(), expected, atol=1e-6)
        assert m.rank == (4 if name in a.modules else 0) + (2 if name in b.modules else 0)


def _both_applied(tiny_sd, lora_a, lora_b):
    """The base pipeline with both adapters loaded at weights 0.7 and 1.5, and its image."""
    pipe = pipeline(tiny_sd)
    pipe.load_lora_weights(str(lora_a.parent), weight_name=lora_a.name, adapter_name="a")
    pipe.load_lora_weights(str(lora_b.parent), weight_name=lora_b.name, adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 1.5])
    return pipe, run(pipe)


def test_exact_merge_output_matches_both_adapters_applied(tiny_sd, lora_a, lora_b, tmp_path):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", f"{lora_a}:0.7", f"{lora_b}:1.5", "-o", str(out)]) == 0
    pipe, both = _both_applied(tiny_sd, lora_a, lora_b)
    pipe = pipeline(tiny_sd)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    assert (run(pipe) - both).abs().max() <= 1e-5


def test_svd_merge_reports_error(lora_a, lora_b, tmp_path, capsys):
    full = tmp_path / "full.safetensors"
    assert main(["merge", str(lora_a), f"{lora_b}:0.5", "-o", str(full), "--rank", "6"]) == 0
    printed = capsys.readouterr().out
    assert "overall relative Frobenius error" in printed
    with safe_open(str(full), "pt") as f:
        assert float(f.metadata()["difftune.svd_error"]) < 1e-6  # rank 6 >= 4 + 2: exact
    exact = read_adapter(full)
    small = tmp_path / "small.safetensors"
    assert main(["merge", str(lora_a), f"{lora_b}:0.5", "-o", str(small), "--rank", "1"]) == 0
    with safe_open(str(small), "pt") as f:
        err = float(f.metadata()["difftune.svd_error"])
    assert 0.05 < err < 1
    reduced = read_adapter(small)
    assert {m.rank for m in reduced.modules.values()} == {1}
    # the reported error is the true one
    num = sum(float((reduced.modules[k].delta() - m.delta()).norm() ** 2) for k, m in exact.modules.items())
    den = sum(float(m.delta().norm() ** 2) for m in exact.modules.values())
    assert abs((num / den) ** 0.5 - err) < 1e-4


def test_merge_kohya_output_and_mismatched_shapes(lora_a, tmp_path, capsys):
    out = tmp_path / "k.safetensors"
    assert main(["merge", str(lora_a), str(lora_a), "-o", str(out), "--format", "kohya"]) == 0
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())  # noqa: SIM118 - safe_open is not a dict
    assert any(k.startswith("lora_unet_") for k in keys)
    from difftune.adapters.formats import LoraModule
    from difftune.adapters.merge import concat_merge
    from difftune.errors import DifftuneError

    a = read_adapter(lora_a)
    b = read_adapter(lora_a)
    name = next(iter(b.modules))
    b.modules[name] = LoraModule(torch.ones(4, 3), torch.ones(5, 4), 4.0)
    with pytest.raises(DifftuneError, match="different shapes"):
        concat_merge([(a, 1.0), (b, 1.0)])


def test_fuse_bakes_adapters_into_a_diffusers_folder(tiny_sd, lora_a, lora_b, tmp_path):
    out = tmp_path / "fused"
    assert main(["merge", f"{lora_a}:0.7", f"{lora_b}:1.5", "--fuse", "--model", str(tiny_sd), "-o", str(out)]) == 0
    assert (out / "model_index.json").is_file()
    pipe, expected = _both_applied(tiny_sd, lora_a, lora_b)
    fused = pipeline(out)
    fused.scheduler = pipe.scheduler
    assert (run(fused) - expected).abs().max() <= 1e-4
