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
ADAPTER_META_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def module_table_header(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> dict[str, str]:
    """``difftune.modules``: rank and alpha of every saved module, so tools need not re-derive them."""
    from difftune.adapters.formats import MODULES_META_KEY, from_diffusers, modules_metadata

    return {MODULES_META_KEY: modules_metadata(from_diffusers(tensors, header, strict=False))}


def matching_targets(module: nn.Module, targets: list[str]) -> list[str]:
    """The targets that match at least one module name (as peft matches a suffix)."""
    names = [n for n, _ in module.named_modules()]
    return [t for t in targets if any(re.search(rf"(^|\.){re.escape(t)}$", n) for n in names)]


def check_targets(module: nn.Module, targets: list[str], key: str, where: str) -> None:
    """Every target must match at least one module name (peft only complains when none match)."""
    found = matching_targets(module, targets)
    for target in targets:
        if target not in found:
            raise ConfigError(f"{key}: {target!r} matches no module in the {where}")


def resolve_targets(module: nn.Module, written: list[str], defaults: tuple[str, ...], key: str, where: str,
                    notes: list[str]) -> list[str]:
    """Targets the user wrote stay strict; the family's defaults adapt to the model (those it lacks are
    dropped, with a note saying which)."""
    if written:
        check_targets(module, written, key, where)
        return list(written)
    found = matching_targets(module, list(defaults))
    if not found:
        raise ConfigError(f"{key}: none of the default targets ({', '.join(defaults)}) matches a module in the "
                          f"{where}; set {key}")
    dropped = [t for t in defaults if t not in found]
    if dropped:
        notes.append(f"note: {key}: this {where} has no {', '.join(dropped)} module; the default LoRA targets "
                     f"used are {', '.join(found)}")
    return found


#: Variants whose file diffusers' loaders read, and the call that loads them (``{folder}`` is filled in).
VARIANT_LOADERS = {
    "lora": "pipe.load_lora_weights(\"{folder}\")",
    "dora": "pipe.load_lora_weights(\"{folder}\")",
    "lokr": 'pipe.{denoiser}.load_lora_adapter("{folder}", weight_name="' + LORA_WEIGHT_NAME + '", prefix="{denoiser}")',
}


class LoRA(Method):
    """LoRA and its peft variants (DoRA, LoHa, LoKr) with optional per-module rank and alpha."""

    name = "lora"

    def lora_config(self, targets: list[str]):
        from peft import LoHaConfig, LoKrConfig, LoraConfig

        m = self.cfg
        alpha = m.alpha if m.alpha is not None else m.rank
        common = {
            "r": m.rank, "target_modules": list(targets),
            "rank_pattern": dict(m.rank_pattern), "alpha_pattern": dict(m.alpha_pattern),
        }
        if m.variant == "loha":
            return LoHaConfig(alpha=alpha, module_dropout=m.dropout, **common)
        if m.variant == "lokr":
            return LoKrConfig(alpha=alpha, module_dropout=m.dropout, **common)
        return LoraConfig(
            lora_alpha=alpha,
            lora_dropout=m.dropout,
            init_lora_weights="gaussian" if m.init == "gaussian" else True,
            use_dora=m.variant == "dora",
            **common,
        )

    def denoiser_targets(self) -> list[str]:
        """The denoiser's targets: as prepared (defaults the model lacks dropped), else as configured."""
        return list(getattr(self, "_denoiser_targets", None) or self.cfg.targets or self.family.default_lora_targets)

    def text_encoder_targets(self) -> list[str]:
        return list(self.cfg.text_encoder_targets or self.family.default_text_encoder_lora_targets)

    def prepare(self, components: Components) -> None:
        from diffusers.training_utils import cast_training_params

        for module in (components.denoiser, components.vae, *components.text_encoders):
            if module is not None:  # encoders already released after caching
                module.requires_grad_(False)
        self._denoiser_targets = targets = resolve_targets(
            components.denoiser, self.cfg.targets, self.family.default_lora_targets, "method.targets",
            self.family.denoiser_name, self.notes)
        components.denoiser.add_adapter(self.lora_config(targets))
        if self.cfg.train_text_encoder:
            encoders = dict(zip(components.encoder_names, components.text_encoders, strict=True))
            for name in self.family.lora_encoder_names(components):
                encoder = encoders[name]
                te_targets = resolve_targets(encoder, self.cfg.text_encoder_targets,
                                             self.family.default_text_encoder_lora_targets,
                                             "method.text_encoder_targets", name, self.notes)
                encoder.add_adapter(self.lora_config(te_targets))
        cast_training_params(list(self.trainable_modules(components).values()), dtype=torch.float32)

    def trainable_modules(self, components: Components) -> dict[str, nn.Module]:
        modules = {"denoiser": components.denoiser}
        if self.cfg.train_text_encoder:
            encoders = dict(zip(components.encoder_names, components.text_encoders, strict=True))
            modules.update((name, encoders[name]) for name in self.family.lora_encoder_names(components))
        return modules

    def on_autocast(self, train_view: Components) -> None:
        skip_input_casts(train_view)

    def lora_modules(self, components: Components) -> dict[str, nn.Module]:
        """Modules carrying a peft adapter, keyed by their prefix in the saved file."""
        prefixes = self.family.lora_prefixes(components)
        out = {}
        for role, module in self.trainable_modules(components).items():
            if getattr(module, "peft_config", None):
                out[prefixes[0] if role == "denoiser" else role] = module
        return out

    def lora_layers(self, components: Components) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Per saved prefix (``unet``, ``text_encoder``...): the saved state dict and its adapter config.

        Keys keep peft's own names (``lora_A``/``lora_B``, ``hada_*``, ``lokr_*``): diffusers'
        ``convert_state_dict_to_diffusers`` renames only attention projections, and diffusers then
        silently skips the renamed keys when a file mixes both spellings (e.g. targets to_q + conv2).
        """
        from peft.utils import get_peft_model_state_dict

        out = {}
        for prefix, module in self.lora_modules(components).items():
            # Adapter tensors only: a LoRA file never carries whole embedding tables (peft's "auto" would
            # look for the base's config to decide, and warn when it is a local folder without one).
            state = get_peft_model_state_dict(module, save_embedding_layers=False)
            out[prefix] = (state, adapter_config_dict(module))
        return out

    def export(self, components: Components, out_dir: Path, metadata: dict[str, str]) -> list[Path]:
        if self.cfg.variant == "loha":
            files = self.export_peft_folders(components, out_dir, metadata)
        else:
            files = self.export_lora_file(components, out_dir, metadata)
        return files + self.export_tool_file(components, out_dir, metadata)

    def export_tool_file(self, components: Components, out_dir: Path, metadata: dict[str, str]) -> list[Path]:
        """The adapter again, in the layout ComfyUI, Automatic1111 and Forge load (docs/tools.md).

        Written for every variant and family where such a layout exists; a DoRA of a transformer family
        (fused modules) has none, so nothing is written for it and the card says so.
        """
        from difftune.adapters import tools
        from difftune.adapters.formats import from_diffusers

        variant = self.cfg.variant
        if not tools.variant_tools(self.family, variant):
            return []
        layers = self.lora_layers(components)
        modules = self.lora_modules(components)
        state = {f"{prefix}.{k}": v for prefix, (s, _) in layers.items() for k, v in s.items()}
        if variant in ("loha", "lokr"):
            scales = {name: float(modules[name.split(".", 1)[0]].get_submodule(name.split(".", 1)[1]).scaling["default"])
                      for name in {k.rsplit(".", 1)[0] for k in state}}
            tensors = tools.lycoris_tool_tensors(state, scales, self.family)
        else:
            header = {ADAPTER_META_KEY: json.dumps({f"{p}.{k}": v for p, (_, cfg) in layers.items()
                                                    for k, v in cfg.items()}, default=str)}
            adapter = from_diffusers(state, header, strict=False)
            magnitudes = base = None
            if variant == "dora":
                magnitudes = {k.removesuffix(".lora_magnitude_vector"): v for k, v in state.items()
                              if k.endswith(".lora_magnitude_vector")}
                base = {name: modules[name.split(".", 1)[0]].get_submodule(name.split(".", 1)[1]).get_base_layer().weight
                        for name in magnitudes}
            tensors, _ = tools.lora_tool_tensors(adapter, self.family, magnitudes, base)
        header = tools.tool_header(self.family, metadata, variant)
        return [tools.write_tool_file(tensors, header, out_dir, self.family, variant)]

    def export_lora_file(self, components: Components, out_dir: Path, metadata: dict[str, str]) -> list[Path]:
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

    def export_peft_folders(self, components: Components, out_dir: Path, metadata: dict[str, str]) -> list[Path]:
        """peft's own adapter format, one folder per model part: ``<prefix>/adapter_{config.json,model.safetensors}``."""
        from difftune.fileio import atomic_write_text

        files = []
        for prefix, (state, config) in self.lora_layers(components).items():
            folder = out_dir / prefix
            folder.mkdir(parents=True, exist_ok=True)
            save_safetensors(state, folder / PEFT_WEIGHT_NAME, {"format": "pt", **metadata})
            atomic_write_text(folder / PEFT_CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True, default=str))
            files += [folder / PEFT_WEIGHT_NAME, folder / PEFT_CONFIG_NAME]
        return files

    def load_snippet(self, folder: str = "{repo_or_folder}") -> str:
        """Python lines that load this run's adapter into ``pipe``."""
        variant = self.cfg.variant
        if variant in VARIANT_LOADERS:
            return VARIANT_LOADERS[variant].format(folder=folder, denoiser=self.family.denoiser_name) + "\n"
        denoiser = self.family.denoiser_name
        return (
            "# LoHa is saved in peft's own format (diffusers' LoRA loaders do not read LoHa):\n"
            "from peft import LoHaConfig, inject_adapter_in_model, set_peft_model_state_dict\n"
            "from safetensors.torch import load_file\n"
            f'inject_adapter_in_model(LoHaConfig.from_pretrained("{folder}/{denoiser}"), pipe.{denoiser})\n'
            f'set_peft_model_state_dict(pipe.{denoiser}, load_file("{folder}/{denoiser}/{PEFT_WEIGHT_NAME}"))\n'
        )

    def card_details(self) -> dict[str, Any]:
        from difftune.adapters.tools import card_usage

        m = self.cfg
        summary = {
            "Method": VARIANT_TITLES[m.variant] + (" (denoiser + text encoder)" if m.train_text_encoder else ""),
            "Rank / alpha": f"{m.rank} / {m.alpha if m.alpha is not None else m.rank}",
            "Dropout": m.dropout,
            "Target modules": ", ".join(self.denoiser_targets()),
            "Loads with": VARIANT_CONSUMERS[m.variant],
        }
        if m.rank_pattern:
            summary["Rank pattern"] = ", ".join(f"{k}: {v}" for k, v in m.rank_pattern.items())
        if m.alpha_pattern:
            summary["Alpha pattern"] = ", ".join(f"{k}: {v}" for k, v in m.alpha_pattern.items())
        return {
            "summary": summary,
            "usage": self.usage_code(self.load_snippet()),
            "tags": ["lora"] if m.variant == "lora" else ["lora", m.variant],
            "tool_usage": card_usage(self.family, m.variant, []),
        }


def skip_input_casts(train_view: Components) -> int:
    """Let plain LoRA layers pass their bf16/fp16 input straight to autocast; return how many.

    peft casts a LoRA layer's input to the LoRA weights' dtype (fp32) before ``lora_A``, and
    autocast casts it straight back to bf16 for the matmul: two copies of the activation, and two
    more in the backward, for every LoRA layer in every step. Under autocast the product is the
    same bf16 matmul either way, so the result is bit-for-bit the same (``tests/methods/test_lora_autocast.py``).
    Variant layers (DoRA, LoHa, LoKr) keep peft's behaviour.
    """
    changed = 0
    roots = [m for m in (train_view.denoiser, *train_view.text_encoders) if m is not None]
    for module in (m for root in roots for m in root.modules()):
        variants = getattr(module, "lora_variant", None)
        if hasattr(module, "lora_A") and isinstance(variants, dict) and not variants:
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed


def adapter_config_dict(module: nn.Module) -> dict[str, Any]:
    """The module's peft adapter config as JSON-ready values (sets become sorted lists)."""
    config = module.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"

VARIANT_TITLES = {"lora": "LoRA", "dora": "DoRA (weight-decomposed LoRA)", "loha": "LoHa", "lokr": "LoKr"}

#: Which consumers read each variant's file (kept in step with docs/methods.md).
VARIANT_CONSUMERS = {
    "lora": "diffusers `load_lora_weights`; ComfyUI, Automatic1111, Forge: the `lora_for_*.safetensors` file",
    "dora": "diffusers `load_lora_weights` (peft ≥ 0.9); ComfyUI, Forge: the `lora_for_*.safetensors` file "
            "(UNet families)",
    "lokr": "diffusers `unet.load_lora_adapter` (≥ 0.42); peft (`LoKrConfig`); ComfyUI (A1111, Forge for UNet "
            "families): the `lora_for_*.safetensors` file",
    "loha": "peft (`LoHaConfig` + `set_peft_model_state_dict`); ComfyUI (A1111, Forge for UNet families): the "
            "`lora_for_*.safetensors` file; not diffusers' LoRA loaders",
}
