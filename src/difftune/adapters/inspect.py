"""``difftune inspect``: what a weight file is, what it was trained on, what it touches, how strong it is."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

from difftune.adapters.detect import adapter_from_tensors, detect_format
from difftune.adapters.formats import MODULES_META_KEY
from difftune.adapters.kohya import kohya_training_summary, prefix_role, unflatten
from difftune.adapters.safe_load import (
    PICKLE_SUFFIXES,
    load_tensors,
    non_finite,
    non_finite_in_file,
    read_header,
    resolve_weight_file,
)
from difftune.adapters.tools import Readiness, readiness

_LORA_FORMATS = ("diffusers", "kohya")
_LYCORIS_FORMATS = ("kohya_loha", "kohya_lokr", "peft_loha", "peft_lokr", "peft_dora")


def block_of(module_key: str) -> str:
    """The block a module belongs to: path up to and including its first index (``unet.down_blocks.1``)."""
    parts = module_key.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2])


def inspect_file(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    file = resolve_weight_file(path)
    info: dict[str, Any] = {"file": str(file), "size_bytes": file.stat().st_size}
    if file.suffix.lower() in PICKLE_SUFFIXES:
        tensors, metadata = load_tensors(file, allow_pickle=allow_pickle)
        shapes = {k: (str(v.dtype), tuple(v.shape), v.numel()) for k, v in tensors.items()}
    else:
        header = read_header(file)
        tensors, metadata = None, header.metadata
        shapes = {k: (t.dtype, t.shape, t.numel) for k, t in header.tensors.items()}
    fmt = detect_format(list(shapes), metadata)
    info["non_finite"] = non_finite(tensors) if tensors is not None else non_finite_in_file(file)
    info.update(format=fmt.name, format_title=fmt.title, tensors=len(shapes),
                parameters=sum(n for _, _, n in shapes.values()),
                dtypes=dict(collections.Counter(d for d, _, _ in shapes.values())))
    if fmt.family:
        info["kohya_family"] = fmt.family
    info["tools"] = [{"tool": r.tool, "ready": r.ready, "status": r.status, "note": r.note}
                     for r in readiness(list(shapes), metadata, fmt)]
    info["difftune"] = _difftune_metadata(metadata)
    if any(k.startswith("ss_") for k in metadata):
        info["kohya_training"] = kohya_training_summary(metadata)
    info["other_metadata_keys"] = sorted(k for k in metadata if not k.startswith(("difftune.", "ss_")))
    if fmt.name in _LORA_FORMATS and fmt.convertible:
        if tensors is None:
            tensors, _ = load_tensors(file)
        info["lora"] = _lora_summary(adapter_from_tensors(tensors, metadata))
    elif fmt.name in _LYCORIS_FORMATS or fmt.name == "kohya":  # incl. kohya with original block names
        names = sorted({_lycoris_module(k) for k in shapes})
        info["modules"] = {"count": len(names), "blocks": _blocks(names)}
    elif fmt.name == "textual_inversion":
        if tensors is None:
            tensors, _ = load_tensors(file)
        info["embedding"] = {k: {"vectors": int(v.shape[0]) if v.dim() > 1 else 1, "dim": int(v.shape[-1]),
                                 "norm": round(float(v.float().norm()), 6)} for k, v in tensors.items()}
    return info


def _lycoris_module(key: str) -> str:
    """``role.path`` of the module a LyCORIS/peft tensor belongs to."""
    name = re.split(r"\.(?:hada_|lokr_|lora_|lora\.|alpha|dora_scale)", key, maxsplit=1)[0]
    if name.startswith("lora_"):
        role, flat = prefix_role(name)
        return f"{role}.{unflatten(flat)}"
    return name


def _difftune_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sorted(metadata.items()):
        if not k.startswith("difftune."):
            continue
        if k == MODULES_META_KEY:
            try:
                mods = json.loads(v)
                out["modules"] = {"count": len(mods),
                                  "rank_alpha": dict(collections.Counter(f"{r}/{a:g}" for r, a in mods.values()))}
            except (json.JSONDecodeError, TypeError, ValueError):
                out["modules"] = "unreadable"
            continue
        out[k.removeprefix("difftune.")] = v
    return out


def _blocks(names: list[str]) -> dict[str, int]:
    return dict(sorted(collections.Counter(block_of(n) for n in names).items()))


def _lora_summary(adapter) -> dict[str, Any]:
    norms = {k: m.delta_norm() for k, m in adapter.modules.items()}
    total = sum(n * n for n in norms.values()) ** 0.5
    return {
        "modules": len(adapter.modules),
        "roles": dict(collections.Counter(k.split(".", 1)[0] for k in adapter.modules)),
        "blocks": _blocks(list(adapter.modules)),
        "rank_alpha": dict(collections.Counter(f"{m.rank}/{m.alpha:g}" for m in adapter.modules.values())),
        "update_norm_total": round(total, 6),
        "update_norms": {k: round(v, 6) for k, v in sorted(norms.items(), key=lambda kv: -kv[1])},
        "zero_modules": sorted(k for k, v in norms.items() if v == 0.0),
    }


def format_info(info: dict[str, Any], top: int = 8) -> str:
    lines = [f"{info['file']}", f"  format:     {info['format_title']} [{info['format']}]",
             f"  tensors:    {info['tensors']:,} ({info['parameters']:,} parameters; "
             + ", ".join(f"{k} ×{v}" for k, v in info["dtypes"].items()) + ")"]
    if info["difftune"]:
        lines.append("  difftune metadata:")
        lines += [f"    {k}: {v}" for k, v in info["difftune"].items()]
    if info.get("kohya_training"):
        lines.append("  kohya training metadata:")
        lines += [f"    {k}: {v}" for k, v in info["kohya_training"].items()]
    lora = info.get("lora")
    if lora:
        lines.append(f"  modules:    {lora['modules']} (" + ", ".join(f"{k} {v}" for k, v in lora["roles"].items()) + ")")
        lines.append("  rank/alpha: " + ", ".join(f"{k} ×{v}" for k, v in lora["rank_alpha"].items()))
        lines.append("  blocks:     " + ", ".join(f"{k} ({v})" for k, v in lora["blocks"].items()))
        lines.append(f"  update norm (Frobenius, total): {lora['update_norm_total']:.4g}")
        for k, v in list(lora["update_norms"].items())[:top]:
            lines.append(f"    {v:10.4g}  {k}")
        if lora["zero_modules"]:
            lines.append(f"  warning: {len(lora['zero_modules'])} module(s) have a zero update (untrained?)")
    if info.get("modules"):
        lines.append(f"  modules:    {info['modules']['count']}")
        lines.append("  blocks:     " + ", ".join(f"{k} ({v})" for k, v in info["modules"]["blocks"].items()))
    if info.get("tools"):
        lines.append("  tools:")
        lines += ["    " + Readiness(r["tool"], r["status"], r["note"]).line() for r in info["tools"]]
    for token, e in (info.get("embedding") or {}).items():
        lines.append(f"  embedding {token}: {e['vectors']} vector(s) of {e['dim']}, norm {e['norm']:.4g}")
    bad = info.get("non_finite")
    if bad:
        lines.append(f"  warning: {len(bad)} tensor(s) hold NaN or infinity (e.g. {bad[0]}): these weights are "
                     "broken and difftune generate refuses them")
    return "\n".join(lines)
