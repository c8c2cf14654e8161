"""DoRA, LoHa and LoKr reduced to a plain LoRA: merged weight updates, then a truncated SVD.

The reduction works on the *merged* update of each module (``W_merged - W``), which every
loader agrees on, so one SVD path serves every method:

* peft-format files (``hada_w1_a``, ``lokr_w1``, ``lora_magnitude_vector``) are injected into the
  real base model with their recorded peft config, merged module by module and diffed;
* kohya/LyCORIS LoHa and LoKr files (``hada_`` / ``lokr_`` with ``.alpha``) have closed-form updates.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from difftune.adapters.detect import detect_format
from difftune.adapters.formats import ADAPTER_META_KEY
from difftune.adapters.kohya import canonical_path, prefix_role, unflatten
from difftune.errors import DifftuneError

_DIFFUSERS_TO_PEFT = ((".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."),
                      (".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."))


def peft_module_deltas(module: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Per tuned module of ``module``: the exact update ``W_merged - W`` of ``adapter_name`` (base left intact)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas = {}
    with torch.no_grad():
        for name, layer in module.named_modules():
            if not isinstance(layer, BaseTunerLayer) or adapter_name not in getattr(layer, "active_adapters", []):
                continue
            base = layer.get_base_layer()
            before = base.weight.detach().clone()
            layer.merge(adapter_names=[adapter_name])
            deltas[name] = (base.weight.detach().double() - before.double())
            base.weight.copy_(before)
            layer.merged_adapters.clear()
    return deltas


def _peft_config(role_meta: dict[str, Any], state: dict[str, torch.Tensor]):
    import dataclasses

    from peft import LoraConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = role_meta.get("peft_type")
    if peft_type is None:
        if not any("lora_magnitude_vector" in k for k in state):
            raise DifftuneError("the header records no peft config (lora_adapter_metadata); cannot rebuild the adapter")
        ranks = [v.shape[0] for k, v in state.items() if ".lora_A." in k]
        targets = sorted({k.split(".lora_")[0] for k in state})
        return LoraConfig(r=ranks[0], lora_alpha=ranks[0], target_modules=targets, use_dora=True)
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {k: v for k, v in role_meta.items() if k in names and k not in ("peft_type", "task_type")}
    return cls(**kwargs)


def peft_file_deltas(tensors: dict[str, torch.Tensor], metadata: dict[str, str], pipe) -> dict[str, torch.Tensor]:
    """Updates of a peft-format DoRA/LoHa/LoKr file, computed on the pipeline's own modules."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    meta = json.loads(metadata.get(ADAPTER_META_KEY) or "{}")
    by_role: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        role, _, rest = key.partition(".")
        for old, new in _DIFFUSERS_TO_PEFT:
            rest = rest.replace(old, new)
        by_role.setdefault(role, {})[rest] = value
    deltas = {}
    for role, state in by_role.items():
        module = getattr(pipe, role, None)
        if not isinstance(module, nn.Module):
            raise DifftuneError(f"the adapter has {role!r} weights but the model has no {role}")
        role_meta = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(role + ".")}
        config = _peft_config(role_meta, state)
        name = "difftune_reduce"
        inject_adapter_in_model(config, module, adapter_name=name)
        result = set_peft_model_state_dict(module, state, adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if name in k or "lora" in k or "hada" in k]
        if unexpected:
            raise DifftuneError(f"{len(unexpected)} {role} weights match no module (e.g. {unexpected[0]})")
        deltas.update({f"{role}.{k}": v for k, v in peft_module_deltas(module, name).items()})
    return deltas


def kohya_lycoris_deltas(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]] | None = None
                         ) -> dict[str, torch.Tensor]:
    """Closed-form updates of kohya-named LoHa (``hada_``) and LoKr (``lokr_``) modules."""
    bases = sorted({k.split(".")[0] for k in tensors})
    out = {}
    for base in bases:
        t = {k.split(".", 1)[1]: v.double() for k, v in tensors.items() if k.split(".")[0] == base}
        if any(k.startswith(("hada_t", "lokr_t")) for k in t):
            raise DifftuneError(f"{base}: Tucker-decomposed (CP) LyCORIS modules are not supported")
        if "hada_w1_a" in t:
            rank = t["hada_w1_b"].shape[0]
            delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
            scale = float(t["alpha"]) / rank if "alpha" in t else 1.0
        elif any(k.startswith("lokr_") for k in t):
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            rank = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else (
                t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None)
            scale = float(t["alpha"]) / rank if rank and "alpha" in t else 1.0
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            delta = torch.kron(w1, w2)
        else:
            raise DifftuneError(f"{base}: neither a LoHa (hada_) nor a LoKr (lokr_) module")
        role, flat = prefix_role(base)
        name = f"{role}.{canonical_path(role, unflatten(flat))}"
        delta = delta * scale
        if shapes and name in shapes and delta.shape != shapes[name]:
            delta = delta.reshape(shapes[name])
        out[name] = delta
    return out


def file_deltas(tensors: dict[str, torch.Tensor], metadata: dict[str, str], pipe=None) -> dict[str, torch.Tensor]:
    """Weight updates of any supported adapter file; ``pipe`` (the base model) is needed for peft formats."""
    fmt = detect_format(list(tensors), metadata)
    if fmt.name in ("kohya_loha", "kohya_lokr"):
        shapes = None
        if pipe is not None:
            shapes = {}
            for role in ("unet", "text_encoder", "text_encoder_2"):
                module = getattr(pipe, role, None)
                if isinstance(module, nn.Module):
                    shapes.update({f"{role}.{n}": tuple(m.weight.shape) for n, m in module.named_modules()
                                   if isinstance(getattr(m, "weight", None), nn.Parameter)})
        return kohya_lycoris_deltas(tensors, shapes)
    if fmt.name in ("peft_dora", "peft_loha", "peft_lokr"):
        if pipe is None:
            raise DifftuneError(f"{fmt.title}: the update depends on the base weights; pass --model PATH")
        return peft_file_deltas(tensors, metadata, pipe)
    if fmt.name in ("diffusers", "kohya"):
        from difftune.adapters.detect import adapter_from_tensors

        adapter = adapter_from_tensors(tensors, metadata)
        return {k: m.delta() for k, m in adapter.modules.items()}
    raise DifftuneError(f"--to-lora: cannot reduce {fmt.title}")


def reduce_file(path, rank: int, *, model: str | None = None, allow_pickle: bool = False):
    """``convert --to-lora``: any adapter file as a plain LoRA of at most ``rank``; (adapter, error report)."""
    from difftune.adapters.merge import reduce_deltas, report_metadata
    from difftune.adapters.safe_load import load_tensors, resolve_weight_file

    file = resolve_weight_file(path)
    tensors, metadata = load_tensors(file, allow_pickle=allow_pickle)
    pipe = None
    if model:
        from difftune.models import load_pipeline

        pipe, _, _ = load_pipeline(model, dtype=torch.float32)
    try:
        deltas = file_deltas(tensors, metadata, pipe)
    except DifftuneError as exc:
        raise DifftuneError(f"{file}: {exc}") from None
    keep = {k: v for k, v in metadata.items() if k.startswith("difftune.") and k != "difftune.modules"}
    keep["difftune.reduced_from"] = detect_format(list(tensors), metadata).name
    adapter, report = reduce_deltas(deltas, rank, keep)
    adapter.metadata.update(report_metadata(report))
    return adapter, report
