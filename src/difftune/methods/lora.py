"""LoRA on the denoiser (and optionally the text encoders) through peft.

The saved file is in diffusers' format, so ``Pipeline.load_lora_weights(folder)`` loads it; the
LoRA config (rank, alpha, targets) travels in the safetensors header, so an alpha that differs
from the rank is restored exactly rather than assumed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.errors import ConfigError
from difftune.fileio import save_safetensors
from difftune.methods.base import Method
from difftune.models.base import Components

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def module_table_header(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> dict[str, str]:
    """``difftune.modules``: rank and alpha of every saved module, so tools need not re-derive them."""
    from difftune.adapters.formats import MODULES_META_KEY, from_diffusers, modules_metadata

    return {MODULES_META_KEY: modules_metadata(from_diffusers(tensors, header, strict=False))}


def check_targets(module: nn.Module, targets: list[str], key: str, where: str) -> None:
    """Every target must match at least one module name (peft only complains when none match)."""
    names = [n for n, _ in module.named_modules()]
    for target in targets:
        pattern = re.compile(rf"(^|\.){re.escape(target)}$")
        if not any(pattern.search(n) for n in names):
            raise ConfigError(f"{key}: {target!r} matches no module in the {where}")


class LoRA(Method):
    name = "lora"

    def lora_config(self, targets: list[str]):
        from peft import LoraConfig

        m = self.config.method
        return LoraConfig(
            r=m.rank,
            lora_alpha=m.alpha if m.alpha is not None else m.rank,
            lora_dropout=m.dropout,
            init_lora_weights="gaussian" if m.init == "gaussian" else True,
            target_modules=list(targets),
        )

    def denoiser_targets(self) -> list[str]:
        return list(self.config.method.targets or self.family.default_lora_targets)

    def text_encoder_targets(self) -> list[str]:
        return list(self.config.method.text_encoder_targets or self.family.default_text_encoder_lora_targets)

    def prepare(self, components: Components) -> None:
        from diffusers.training_utils import cast_training_params

        for module in (components.denoiser, components.vae, *components.text_encoders):
            module.requires_grad_(False)
        targets = self.denoiser_targets()
        check_targets(components.denoiser, targets, "method.targets", self.family.denoiser_name)
        components.denoiser.add_adapter(self.lora_config(targets))
        if self.config.method.train_text_encoder:
            te_targets = self.text_encoder_targets()
            encoders = dict(zip(components.encoder_names, components.text_encoders, strict=True))
            for name in self.family.lora_encoder_names(components):
                encoder = encoders[name]
                check_targets(encoder, te_targets, "method.text_encoder_targets", name)
                encoder.add_adapter(self.lora_config(te_targets))
        cast_training_params(list(self.trainable_modules(components).values()), dtype=torch.float32)

    def trainable_modules(self, components: Components) -> dict[str, nn.Module]:
        modules = {"denoiser": components.denoiser}
        if self.config.method.train_text_encoder:
            encoders = dict(zip(components.encoder_names, components.text_encoders, strict=True))
            modules.update((name, encoders[name]) for name in self.family.lora_encoder_names(components))
        return modules

    def lora_layers(self, components: Components) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Per saved prefix (``unet``, ``text_encoder``...): the diffusers-format state dict and its LoRA config."""
        from peft.utils import get_peft_model_state_dict

        prefixes = self.family.lora_prefixes(components)
        out = {}
        for role, module in self.trainable_modules(components).items():
            prefix = prefixes[0] if role == "denoiser" else role
            # peft's own key names (lora_A/lora_B): diffusers' convert_state_dict_to_diffusers renames
            # only attention projections, and diffusers then silently skips those renamed keys when a
            # file mixes both spellings (e.g. targets to_q + proj_in).
            state = get_peft_model_state_dict(module)
            config = module.peft_config["default"].to_dict()
            out[prefix] = (state, {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()})
        return out

    def export(self, components: Components, out_dir: Path, metadata: dict[str, str]) -> list[Path]:
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

        tensors: dict[str, torch.Tensor] = {}
        adapter_meta: dict[str, Any] = {}
        for prefix, (state, config) in self.lora_layers(components).items():
            tensors.update({f"{prefix}.{k}": v for k, v in state.items()})
            adapter_meta.update({f"{prefix}.{k}": v for k, v in config.items()})
        header = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_meta, sort_keys=True, default=str)}
        header.update(metadata)
        header.update(module_table_header(tensors, header))
        path = out_dir / LORA_WEIGHT_NAME
        save_safetensors(tensors, path, header)
        return [path]

    def card_details(self) -> dict[str, Any]:
        m = self.config.method
        pipe = self.family.pipeline_class().__name__
        return {
            "summary": {
                "Method": "LoRA" + (" (denoiser + text encoder)" if m.train_text_encoder else ""),
                "Rank / alpha": f"{m.rank} / {m.alpha if m.alpha is not None else m.rank}",
                "Dropout": m.dropout,
                "Target modules": ", ".join(self.denoiser_targets()),
            },
            "usage": (
                "import torch\n"
                f"from diffusers import {pipe}\n\n"
                f'pipe = {pipe}.from_pretrained("{{base_model}}", torch_dtype=torch.float16).to("cuda")\n'
                'pipe.load_lora_weights("{repo_or_folder}")\n'
                'image = pipe("{prompt}").images[0]\n'
            ),
            "tags": ["lora"],
        }
