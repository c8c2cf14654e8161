"""Run a diffusers training example script with the benchmark-only torchvision stand-in.

    python benchmarks/run_diffusers_example.py path/to/train_text_to_image_lora.py [script args...]

transformers, peft and diffusers are imported first, so their checks see no torchvision; then
the stand-in from ``torchvision_shim/`` is registered and the script runs as ``__main__``.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

import diffusers  # noqa: F401
import peft  # noqa: F401
import transformers  # noqa: F401

SHIM = Path(__file__).resolve().parent / "torchvision_shim" / "torchvision"


def _register_shim() -> None:
    for name, file in (("torchvision", SHIM / "__init__.py"), ("torchvision.transforms", SHIM / "transforms.py"),
                       ("torchvision.transforms.functional", SHIM / "transforms_functional.py")):
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]


if __name__ == "__main__":
    script = sys.argv[1]
    _register_shim()
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
