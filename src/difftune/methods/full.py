"""Full fine-tuning: every weight of the denoiser (and optionally the text encoders) trains.

The result is a complete diffusers pipeline folder, ``<output>/pipeline``, which the family's
pipeline class loads with ``from_pretrained``; with ``method.save_single_file`` also
``<output>/model.safetensors`` in the original (LDM) layout, written by the family's
``save_single_file`` converter. With ``method.ema`` the run exports the moving average of the weights
(:mod:`difftune.methods.ema`), as for every method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.errors import ConfigError
from difftune.fileio import atomic_folder
from difftune.methods.base import Method
from difftune.models.base import Components

PIPELINE_FOLDER = "pipeline"
SINGLE_FILE = "model.safetensors"


class FullFineTune(Method):
    """Every weight of the denoiser (optionally the text encoders), with optional EMA; saves a pipeline folder."""

    name = "full"
    exports_frozen_modules = True

    def prepare(self, components: Components) -> None:
        if self.cfg.save_single_file and not self.family.writes_single_file:
            # A file of diffusers-format keys would not load in A1111 or ComfyUI, so none is written.
            raise ConfigError(
                f"method.save_single_file: {self.family.title} has no converter to the original single-file "
                f"layout; unset it (the pipeline folder <output.dir>/{PIPELINE_FOLDER} loads with from_pretrained)"
            )
        components.vae.requires_grad_(False)
        for encoder in components.text_encoders:
            encoder.requires_grad_(False)
        for module in self.trainable_modules(components).values():
            module.to(torch.float32)  # trainable weights stay in fp32; autocast handles mixed precision
            module.requires_grad_(True)

    def trainable_modules(self, components: Components) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"denoiser": components.denoiser}
        if self.cfg.train_text_encoder:
            modules.update(zip(components.encoder_names, components.text_encoders, strict=True))
        return modules

    def export(self, components: Components, out_dir: Path, metadata: dict[str, str]) -> list[Path]:
        trained = components.with_modules(self.trainable_modules(components))  # EMA weights if the run swapped them in
        denoiser, encoders = trained.denoiser, trained.text_encoders
        pipe = self.family.build_pipeline(components, denoiser, encoders)
        folder = out_dir / PIPELINE_FOLDER
        with atomic_folder(folder) as tmp:  # a kill mid-export never leaves a half-written pipeline
            pipe.save_pretrained(tmp, safe_serialization=True)
        files = [folder / "model_index.json"]
        if self.cfg.save_single_file:
            files.append(self.family.save_single_file(components, out_dir / SINGLE_FILE, denoiser, encoders,
                                                      metadata=metadata))
        return files

    def card_details(self) -> dict[str, Any]:
        m = self.cfg
        pipe = self.family.pipeline_class().__name__
        trained = self.family.denoiser_name + (" + text encoder(s)" if m.train_text_encoder else "")
        return {
            "summary": {
                "Method": f"Full fine-tuning ({trained})",
                "Saved as": f"diffusers pipeline folder `{PIPELINE_FOLDER}/`"
                + (f" and single file `{SINGLE_FILE}` (original layout)" if m.save_single_file else ""),
            },
            "usage": self.usage_code(
                model=f"{{repo_or_folder}}/{PIPELINE_FOLDER}",
                after=(f'# or the single file, e.g. for A1111 / ComfyUI: {pipe}.from_single_file('
                       f'"{{repo_or_folder}}/{SINGLE_FILE}")\n' if m.save_single_file else ""),
            ),
            "tags": ["full-fine-tune"],
        }
