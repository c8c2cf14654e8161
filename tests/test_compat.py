"""The install guard and ``difftune env``: a known-broken combination is named with its fix."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from difftune.compat import KNOWN_BREAKS, BrokenInstall, known_problems


def _versions(**installed):
    return lambda name: installed.get(name.replace("-", "_"))


@pytest.mark.parametrize(
    ("transformers", "peft", "broken"),
    [("5.24.0", "0.21.2", True), ("5.30.1", None, True), ("5.24.0", "0.22.0", False), ("5.23.0", "0.21.2", False)],
)
def test_transformers_needs_a_peft_that_supports_it(transformers, peft, broken):
    problems = known_problems(_versions(transformers=transformers, peft=peft, torch="2.13.0"))
    assert bool(problems) is broken
    if broken:
        assert f"transformers {transformers}" in problems[0]
        assert "pip install 'transformers==5.23.0'" in problems[0]


def test_torchvision_must_match_torch():
    assert known_problems(_versions(torch="2.13.0+cpu", torchvision="0.28.0")) == []
    (problem,) = known_problems(_versions(torch="2.13.0+cpu", torchvision="0.29.1"))
    assert "torchvision 0.29.1" in problem and "0.28.x" in problem and "pip uninstall torchvision" in problem


def test_every_rule_names_a_package_and_a_command():
    for rule in KNOWN_BREAKS:
        assert "pip " in rule.fix


def _fake_install(root: Path, name: str, version: str) -> None:
    """A dist-info folder ahead of site-packages: importlib.metadata reports this version."""
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def _run(args: list[str], fake: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(fake), "HF_HUB_OFFLINE": "1"}
    env.pop("DIFFTUNE_SKIP_VERSION_CHECK", None)
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_a_known_bad_install_stops_before_training_with_what_to_install(tmp_path, tiny_sd, shapes_data, run_config):
    from difftune import load_config
    from difftune.config.loader import config_to_dict, dump_toml

    fake = tmp_path / "fake-site"
    _fake_install(fake, "transformers", "5.24.0")
    config = tmp_path / "run.toml"
    config.write_text(dump_toml(config_to_dict(load_config(data=run_config(tiny_sd, shapes_data, tmp_path / "out")))))

    train = _run([sys.executable, "-m", "difftune", "train", str(config)], fake, tmp_path)
    assert train.returncode == 2, train.stderr
    assert "transformers 5.24.0 needs peft" in train.stderr
    assert "pip install 'transformers==5.23.0'" in train.stderr
    assert "Traceback" not in train.stderr
    assert not (tmp_path / "out").exists()  # stopped before anything was written

    library = _run([sys.executable, "-c", "import difftune.training.loop"], fake, tmp_path)
    assert "BrokenInstall" in library.stderr and "transformers 5.24.0" in library.stderr
    assert issubclass(BrokenInstall, ImportError)

    env = _run([sys.executable, "-m", "difftune", "env"], fake, tmp_path)
    assert env.returncode == 0
    assert "- transformers: 5.24.0" in env.stdout
    assert "Known problems: transformers 5.24.0 needs peft" in env.stdout


def test_env_prints_every_version_for_a_bug_report(tmp_path):
    import diffusers
    import peft
    import torch
    import transformers

    result = _run([sys.executable, "-m", "difftune", "env"], tmp_path / "nothing", tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"- Python: {sys.version.split()[0]}" in out
    assert f"- torch: {torch.__version__}" in out and "device: cpu" in out and "CUDA: no" in out
    from difftune.compat import cpu_has_native_bf16, cpu_model

    assert ("CPU bf16: native" if cpu_has_native_bf16() else "CPU bf16: emulated") in out
    assert f"CPU: {cpu_model()}" in out
    for name, module in [("diffusers", diffusers), ("transformers", transformers), ("peft", peft)]:
        assert f"- {name}: {module.__version__}" in out
    assert "- accelerate: " in out and "- difftune: " in out
    for extra in ("wandb", "bnb", "prodigy", "datasets"):
        assert f"- extra [{extra}]: " in out
    assert "Known problems: none" in out


def test_torchao_import_noise_is_dropped_and_other_warnings_kept():
    """Importing the training stack (peft imports torchao) prints no warnings about kernels this build lacks."""
    import logging

    import difftune.models  # noqa: F401  (its import quiets the known noise)

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addHandler(handler)
    try:
        logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
                                             "Could not load this library")
        logging.getLogger("torch.utils._pytree").warning("<enum 'KernelPreference'> is an Enum subclass and is now "
                                                         "natively supported by torch.compile as an opaque value type.")
        logging.getLogger("torchao").warning("something else")
    finally:
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).removeHandler(handler)
    assert seen == ["something else"]


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_the_no_torchvision_fallback_notice_is_not_shown():
    """transformers says it falls back to PIL image processors without torchvision: difftune's intended path."""
    code = ("import sys; from difftune.compat import quiet_import_noise; "
            "sys.argv[1:] == ['quiet'] and quiet_import_noise(); from transformers import CLIPImageProcessor")
    notice = "requires torchvision (not installed)"
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert notice in loud.stderr  # what a user would see without the filter
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], capture_output=True, text=True, check=True)
    assert notice not in quiet.stderr, quiet.stderr


@pytest.mark.parametrize("flags, native", [("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16", True),
                                           ("fpu avx2 avx512f", False)])
def test_cpu_model_and_native_bf16_are_read_from_cpuinfo(tmp_path, monkeypatch, flags, native):
    from difftune import compat

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(compat, "Path", lambda p: info if p == "/proc/cpuinfo" else Path(p))
    compat.cpu_has_native_bf16.cache_clear()
    try:
        assert compat.cpu_model() == "Test CPU 9000" and compat.cpu_has_native_bf16() is native
        info.unlink()  # no /proc/cpuinfo (not Linux): the machine type, and no native bf16 assumed
        compat.cpu_has_native_bf16.cache_clear()
        assert compat.cpu_model() == platform.machine() and compat.cpu_has_native_bf16() is False
    finally:
        compat.cpu_has_native_bf16.cache_clear()
