"""The kohya LoRA format read by ComfyUI, Automatic1111 and Forge.

A module ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` of the UNet becomes
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` with tensors
``.lora_down.weight``, ``.lora_up.weight`` and a scalar ``.alpha`` (the trained alpha, not the
rank). Text encoders use ``lora_te_`` (one encoder) or ``lora_te1_``/``lora_te2_`` (two).
diffusers' own kohya loader (``_convert_non_diffusers_lora_to_diffusers``) reads these names back.

Transformer families (SD3, Flux) are named after their original modules instead, some of which fuse
several diffusers modules (:mod:`difftune.adapters.kohya_fused`); their text encoders use the
family's prefixes (``lora_te1_`` for CLIP-L, ...).
"""

from __future__ import annotations

import json

import torch

from difftune.adapters import kohya_fused
from difftune.adapters.formats import (
    MODULES_META_KEY,
    LoraAdapter,
    LoraModule,
    modules_metadata,
    recorded_modules,
)
from difftune.errors import DifftuneError

#: Module-name parts that themselves contain ``_`` (diffusers UNets and CLIP text encoders).
#: Flattened names are split on ``_`` and these are re-joined, longest first.
COMPOUND_PARTS = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "encoder_hid_proj", "class_embedding",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
    "layer_norm1", "layer_norm2", "text_projection", "token_embedding", "position_embedding",
    "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out", "norm_out", "proj_attn", "wi_0", "wi_1",
)
_COMPOUNDS = sorted((c.split("_") for c in COMPOUND_PARTS), key=len, reverse=True)


#: Where kohya sd-scripts puts each part of a LoRA, by pipeline attribute (the role in difftune's own
#: adapter keys). Numbered text-encoder prefixes are for models with several encoders (SDXL: ``lora_te1``,
#: ``lora_te2``); a model with one writes ``lora_te``. Transformer families name their parts in their
#: ``kohya_names`` (``models/kohya_names.py``).
ROLE_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2",
                 "text_encoder_3": "lora_te3"}
SINGLE_TEXT_PREFIX = "lora_te"
#: Roles a UNet-family kohya file can hold when difftune writes one.
_WRITABLE_ROLES = ("unet", "text_encoder", "text_encoder_2")
_PREFIX_ROLES = {**{prefix: role for role, prefix in ROLE_PREFIXES.items()}, SINGLE_TEXT_PREFIX: "text_encoder"}


def role_prefixes(roles: list[str]) -> dict[str, str]:
    """Kohya prefix per role: ``lora_unet``, ``lora_te`` or ``lora_te1``/``lora_te2``."""
    numbered = "text_encoder_2" in roles
    for role in roles:
        if role not in _WRITABLE_ROLES:
            raise DifftuneError(
                f"kohya export: no kohya naming is defined here for {role!r} LoRA layers "
                "(supported: UNet families SD 1.x/2.x/SDXL and their CLIP text encoders)"
            )
    return {role: SINGLE_TEXT_PREFIX if role == "text_encoder" and not numbered else ROLE_PREFIXES[role]
            for role in roles}


def _split_prefix(name: str) -> tuple[str, str]:
    for prefix in _PREFIX_ROLES:  # numbered prefixes before the bare ``lora_te``
        if name.startswith(prefix + "_"):
            return prefix, name[len(prefix) + 1:]
    raise DifftuneError(f"{name}: not a kohya LoRA name (expected lora_unet_, lora_te_ or lora_te1_/2_/3_)")


def prefix_role(name: str, layout=None) -> tuple[str, str]:
    """(pipeline attribute, flattened module path) of a kohya module name."""
    prefix, flat = _split_prefix(name)
    if layout is not None:
        role = "transformer" if prefix == "lora_unet" else layout.role_for_prefix(prefix)
        if role is None and prefix == SINGLE_TEXT_PREFIX:  # ComfyUI writes the CLIP-L of Flux as lora_te_
            role = "text_encoder"
        if role is None:
            raise DifftuneError(f"{name}: {layout.title} kohya files have no {prefix}_ text encoder")
        return role, flat
    return _PREFIX_ROLES[prefix], flat


def unflatten(flat: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``."""
    parts = flat.split("_")
    out, i = [], 0
    while i < len(parts):
        for comp in _COMPOUNDS:
            if parts[i:i + len(comp)] == comp:
                out.append("_".join(comp))
                i += len(comp)
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


#: CLIP text-encoder paths start here in transformers >= 5; kohya names keep the ``text_model`` level.
#: (T5 paths start ``encoder.block.``, so ``encoder.layers.`` tells the two apart.)
_CLIP_ROOTS = ("encoder.layers.", "embeddings.", "final_layer_norm")


def _kohya_path(role: str, path: str) -> str:
    if role.startswith("text_encoder") and path.startswith(_CLIP_ROOTS):
        return "text_model." + path
    return path


def canonical_path(role: str, path: str) -> str:
    """Text-encoder paths as the installed transformers names them (``text_model.`` dropped from v5)."""
    if role.startswith("text_encoder") and path.startswith("text_model.") and _clip_without_text_model():
        return path[len("text_model."):]
    return path


def _clip_without_text_model() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def to_kohya(adapter: LoraAdapter, family: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a kohya file. ``family`` (else the adapter's recorded one) picks the naming
    of transformer families; without either, it is inferred from the module names."""
    layout = _export_layout(adapter, family)
    tensors = {}

    def put(base: str, m: LoraModule, name: str) -> None:
        if f"{base}.lora_down.weight" in tensors:
            raise DifftuneError(f"{name}: its kohya name {base} collides with another module")
        tensors[f"{base}.lora_down.weight"] = m.down
        tensors[f"{base}.lora_up.weight"] = m.up
        tensors[f"{base}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)

    if layout is None:
        prefixes = role_prefixes(adapter.roles())
    else:
        prefixes = {}
        for role in adapter.roles():
            prefixes[role] = kohya_fused.UNET_PREFIX if role == "transformer" else layout.text_prefix(role)
            if prefixes[role] is None:
                raise DifftuneError(f"kohya export: {layout.title} kohya files have no name for {role!r} LoRA layers")
        denoiser = {k.split(".", 1)[1]: m for k, m in adapter.modules.items() if k.startswith("transformer.")}
        for flat, m in layout.fuse(denoiser).items():
            put(f"{kohya_fused.UNET_PREFIX}_{flat}", m, flat)
    for name, m in adapter.modules.items():
        role, path = name.split(".", 1)
        if layout is not None and role == "transformer":
            continue
        put(f"{prefixes[role]}_{_kohya_path(role, path).replace('.', '_')}", m, name)
    header = {"format": "pt"}
    header.update(adapter.metadata)
    if layout is not None:
        header.setdefault("difftune.family", layout.family)
    header[MODULES_META_KEY] = modules_metadata(adapter)
    return tensors, header


def kohya_module_names(adapter: LoraAdapter, family: str | None = None) -> dict[str, str]:
    """``role.path`` -> kohya module name, for families named like diffusers (UNet families).

    Transformer families fuse modules, so their names are not one per module; they are refused here.
    """
    if _export_layout(adapter, family) is not None:
        raise DifftuneError(f"kohya export: per-module names exist only for UNet families, not {family!r}")
    prefixes = role_prefixes(adapter.roles())
    return {name: f"{prefixes[name.split('.', 1)[0]]}_{_kohya_path(*name.split('.', 1)).replace('.', '_')}"
            for name in adapter.modules}


def diffusers_note(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> str | None:
    """For a kohya file of a transformer family: which of its modules diffusers' own loader skips, if any."""
    layout = kohya_fused.layout_for_family(header.get("difftune.family"))
    return layout.diffusers_gaps(tensors) if layout is not None else None


def _export_layout(adapter: LoraAdapter, family: str | None):
    named = family or adapter.metadata.get("difftune.family")
    layout = kohya_fused.layout_for_family(named)
    if layout is None and "transformer" in adapter.roles():
        if named and named in _known_families():
            raise DifftuneError(f"kohya export: family {named!r} has no kohya naming for transformer LoRA layers")
        paths = [k.split(".", 1)[1] for k in adapter.modules if k.startswith("transformer.")]
        layout = kohya_fused.layout_for_modules(paths)
    return layout


def _known_families() -> tuple[str, ...]:
    from difftune.models import FAMILIES

    return FAMILIES.names()


def from_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               module_names: dict[str, list[str]] | None = None, family: str | None = None) -> LoraAdapter:
    """Read kohya LoRA pairs. Names are resolved against ``module_names`` when given, else by vocabulary.

    Transformer families' original module names are recognised by themselves (or by ``family`` / the
    recorded ``difftune.family``) and split into diffusers modules.
    """
    exact = {role: {_kohya_path(role, p).replace(".", "_"): p for p in paths}
             for role, paths in (module_names or {}).items()}
    pairs: dict[str, LoraModule] = {}
    left = set(tensors)
    for key in sorted(tensors):
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        up_key, alpha_key = f"{base}.lora_up.weight", f"{base}.alpha"
        if up_key not in tensors:
            raise DifftuneError(f"{base}: has lora_down but no lora_up weight")
        down, up = tensors[key], tensors[up_key]
        if up.shape[1] != down.shape[0]:
            raise DifftuneError(f"{base}: lora_up has rank {up.shape[1]} but lora_down has rank {down.shape[0]}")
        # Without an alpha, kohya loaders use alpha = rank (scale 1).
        alpha = float(tensors[alpha_key].item()) if alpha_key in tensors else float(down.shape[0])
        pairs[base] = LoraModule(down, up, alpha)
        left -= {key, up_key, alpha_key}
    if left:
        extra = sorted(left)
        raise DifftuneError(f"{len(extra)} tensor(s) are not kohya LoRA pairs (e.g. {extra[0]})")
    if not pairs:
        raise DifftuneError("no kohya LoRA weights found (expected keys ending in .lora_down.weight)")
    layout = import_layout(list(pairs), metadata, family)
    recorded = recorded_modules(metadata)
    modules: dict[str, LoraModule] = {}
    for base, m in pairs.items():
        role, flat = prefix_role(base, layout)
        if layout is not None and role == "transformer":
            for path, part in layout.split(flat, m, recorded).items():
                modules[f"transformer.{path}"] = part
            continue
        path = exact.get(role, {}).get(flat)
        if path is None:
            # CLIP with projection keeps ``text_model.`` in transformers >= 5; the recorded names say which.
            literal = unflatten(flat)
            path = literal if f"{role}.{literal}" in recorded else canonical_path(role, literal)
        modules[f"{role}.{path}"] = m
    meta = {k: v for k, v in metadata.items() if k.startswith("difftune.") and k != MODULES_META_KEY}
    if layout is not None:
        meta.setdefault("difftune.family", layout.family)
    return LoraAdapter(modules, meta)


def import_layout(bases: list[str], metadata: dict[str, str], family: str | None = None):
    """The transformer family whose kohya naming these module names use, or ``None`` (diffusers-like names)."""
    layout = kohya_fused.layout_for_family(family or metadata.get("difftune.family"))
    if layout is None:
        unet = [b[len("lora_unet_"):] for b in bases if b.startswith("lora_unet_")]
        layout = kohya_fused.layout_for_kohya_names(unet) if unet else None
    return layout


def sgm_to_diffusers_names(tensors: dict[str, torch.Tensor], unet_config) -> dict[str, torch.Tensor]:
    """kohya names in the original UNet layout (``input_blocks_4_1_...``) renamed to diffusers block names.

    Uses diffusers' own mapping (the one ``load_lora_weights`` applies), which needs the UNet's
    ``layers_per_block``.
    """
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    try:
        mapped = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), unet_config)
    except (ValueError, IndexError) as exc:
        raise DifftuneError(f"original (sgm) block names could not be mapped to this model ({exc})") from None
    # The mapping fixes the indices; the block words are renamed afterwards, as diffusers does.
    renames = (("lora_unet_input_blocks_", "lora_unet_down_blocks_"), ("lora_unet_middle_block_", "lora_unet_mid_block_"),
               ("lora_unet_output_blocks_", "lora_unet_up_blocks_"))
    out = {}
    for key, value in mapped.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def kohya_training_summary(metadata: dict[str, str]) -> dict[str, str]:
    """The most useful ``ss_*`` entries kohya sd-scripts writes, for ``inspect``."""
    wanted = ("ss_sd_model_name", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
              "ss_network_args", "ss_steps", "ss_epoch", "ss_learning_rate", "ss_resolution", "ss_output_name")
    out = {k: metadata[k] for k in wanted if k in metadata}
    if "ss_tag_frequency" in metadata:
        try:
            tags = json.loads(metadata["ss_tag_frequency"])
            out["ss_tag_frequency"] = f"{sum(len(v) for v in tags.values())} tags"
        except (json.JSONDecodeError, AttributeError):
            pass
    return out
