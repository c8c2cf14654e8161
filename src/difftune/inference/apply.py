"""Loading adapters into a pipeline loudly: every LoRA module must land on a module of the model.

diffusers warns (or says nothing) when keys do not match and the adapter then does nothing.
Here the adapter's modules are checked against the pipeline's own module names before loading,
and the loaded LoRA layers are checked afterwards; a file that matches nothing is an error and a
partial match prints every unmatched module.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from torch import nn

from difftune.adapters.convert import read_adapter, write_adapter
from difftune.adapters.formats import LoraAdapter
from difftune.adapters.safe_load import load_tensors, require_finite
from difftune.errors import DifftuneError


def weight_module_names(module: nn.Module) -> list[str]:
    """Names of the modules a LoRA can target (those that own a weight matrix or kernel)."""
    out = []
    for name, sub in module.named_modules():
        w = getattr(sub, "weight", None)
        if name and isinstance(w, nn.Parameter) and w.dim() >= 2 and ".lora_" not in name:
            out.append(name.replace(".base_layer", ""))
    return list(dict.fromkeys(out))


def pipeline_module_names(pipe, roles: list[str]) -> dict[str, list[str]]:
    out = {}
    for role in roles:
        module = getattr(pipe, role, None)
        if isinstance(module, nn.Module):
            out[role] = weight_module_names(module)
    return out


#: Pipeline attributes that can carry LoRA layers.
ADAPTER_ROLES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def pipeline_target(pipe) -> dict:
    """Keyword arguments for :func:`read_adapter` describing ``pipe``: its module names and UNet config."""
    unet = getattr(pipe, "unet", None)
    return {"module_names": pipeline_module_names(pipe, list(ADAPTER_ROLES)),
            "unet_config": unet.config if isinstance(unet, nn.Module) else None}


def unmatched_modules(adapter: LoraAdapter, names: dict[str, list[str]]) -> list[str]:
    known = {f"{role}.{n}" for role, ns in names.items() for n in ns}
    return sorted(k for k in adapter.modules if k not in known)


def check_coverage(adapter: LoraAdapter, names: dict[str, list[str]], label: str, log=print) -> LoraAdapter:
    """The adapter restricted to modules the model has; error if none, warning listing the rest."""
    missing = unmatched_modules(adapter, names)
    if len(missing) == len(adapter.modules):
        raise DifftuneError(
            f"{label}: none of its {len(adapter.modules)} LoRA modules exist in this model "
            f"(e.g. {missing[0]}); it was made for a different architecture"
        )
    if missing:
        log(f"warning: {label}: {len(missing)} of {len(adapter.modules)} LoRA modules match nothing in this "
            "model and are NOT applied:\n  " + "\n  ".join(missing))
        adapter = LoraAdapter({k: v for k, v in adapter.modules.items() if k not in missing}, adapter.metadata)
    return adapter


def check_base_model(adapter: LoraAdapter, family, components, label: str, log=print) -> bool:
    """Warn when the adapter records a different denoiser config than the loaded model's. True if it matches."""
    recorded = adapter.metadata.get("difftune.denoiser_config_sha256")
    if not recorded:
        return True
    actual = family.denoiser_config_hash(components)
    if recorded != actual:
        base = adapter.metadata.get("difftune.base_model", "another model")
        log(f"warning: {label}: trained on {base} whose {family.denoiser_name} config differs from this model's "
            f"(hash {recorded} vs {actual}); the result may be poor")
        return False
    return True


def load_adapters(pipe, specs: list[tuple[str, float]], *, family=None, components=None,
                  allow_pickle: bool = False, log=print) -> list[str]:
    """Load each ``(file_or_folder, weight)`` into ``pipe`` through diffusers' own loader, checked."""
    names, weights = [], []
    for i, (path, weight) in enumerate(specs):
        target = pipeline_target(pipe)
        require_finite(load_tensors(path, allow_pickle=allow_pickle)[0], str(path))
        adapter = read_adapter(path, allow_pickle=allow_pickle, **target)
        adapter = check_coverage(adapter, target["module_names"], str(path), log)
        if family is not None and components is not None:
            check_base_model(adapter, family, components, str(path), log)
        name = f"adapter_{i}"
        with tempfile.TemporaryDirectory() as tmp:
            file = write_adapter(adapter, Path(tmp) / "adapter.safetensors", "diffusers")
            try:
                pipe.load_lora_weights(tmp, weight_name=file.name, adapter_name=name)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise DifftuneError(f"{path}: diffusers could not load it ({str(exc).splitlines()[0]})") from None
        not_loaded = [k for k in adapter.modules if not _has_adapter(pipe, k, name)]
        if not_loaded:
            raise DifftuneError(
                f"{path}: {len(not_loaded)} of {len(adapter.modules)} LoRA modules did not load "
                "(e.g. " + ", ".join(not_loaded[:5]) + ")"
            )
        log(f"loaded {path}: {len(adapter.modules)} modules, weight {weight:g}")
        names.append(name)
        weights.append(weight)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return names


def _has_adapter(pipe, key: str, adapter_name: str) -> bool:
    role, path = key.split(".", 1)
    try:
        module = getattr(pipe, role).get_submodule(path)
    except AttributeError:
        return False
    lora_a = getattr(module, "lora_A", None)
    return lora_a is not None and adapter_name in lora_a
