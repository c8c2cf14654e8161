"""What kind of weight file this is, from its tensor names and header alone, and any convertible LoRA
file read into a :class:`~difftune.adapters.formats.LoraAdapter`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difftune.adapters import kohya
from difftune.adapters.formats import DOWN_SUFFIXES, LoraAdapter, from_diffusers
from difftune.adapters.kohya_fused import layout_for_kohya_names
from difftune.errors import DifftuneError


@dataclass
class FormatInfo:
    """A recognised file format: ``name`` is a stable id, ``title`` a phrase for people."""

    name: str
    title: str
    convertible: bool = False
    #: kohya names in the original LDM/sgm UNet layout (input_blocks/middle_block/output_blocks).
    sgm: bool = False
    #: The model family whose original module names a kohya file uses (SD3, Flux), if recognised.
    family: str | None = None


def detect_format(keys: list[str], metadata: dict[str, str]) -> FormatInfo:
    """Recognise a weight file from its tensor names and header metadata alone."""
    keyset = set(keys)
    has = lambda s: any(s in k for k in keys)  # noqa: E731
    kohya = any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_"))
                for k in keys)
    by = " (kohya sd-scripts, ss_* training metadata)" if any(k.startswith("ss_") for k in metadata) else ""
    if kohya and has(".hada_w1_a"):
        return FormatInfo("kohya_loha", "LyCORIS LoHa, kohya naming" + by)
    if kohya and (has(".lokr_w1") or has(".lokr_w2")):
        return FormatInfo("kohya_lokr", "LyCORIS LoKr, kohya naming" + by)
    if kohya and has(".lora_down.weight"):
        sgm = has("_input_blocks_") or has("_output_blocks_") or has("_middle_block_")
        dora = " with DoRA scales" if has(".dora_scale") else ""
        family = kohya_family(keys)
        if family is not None:
            layout = f"{family.title} original module names"
        else:
            layout = "original (sgm/LDM) block names" if sgm else "diffusers block names"
        return FormatInfo("kohya", f"kohya LoRA, {layout}{dora}{by}", convertible=not sgm and not dora,
                          sgm=sgm and not dora and family is None, family=family.family if family else None)
    if has(".hada_w1_a"):
        return FormatInfo("peft_loha", "peft LoHa (diffusers prefixes)")
    if has(".lokr_w1") or has(".lokr_w2"):
        return FormatInfo("peft_lokr", "peft LoKr (diffusers prefixes)")
    if has("_lora.down.weight"):
        return FormatInfo("diffusers_old", "diffusers LoRA, old attention-processor naming (to_q_lora)")
    if any(k.endswith(DOWN_SUFFIXES) for k in keys):
        if has("lora_magnitude_vector") or has(".lora.magnitude"):
            return FormatInfo("peft_dora", "peft DoRA (diffusers prefixes)")
        return FormatInfo("diffusers", "diffusers / peft LoRA", convertible=True)
    if keyset & {"emb_params", "clip_l", "clip_g", "string_to_param.*"} or has("string_to_param"):
        return FormatInfo("textual_inversion", "textual-inversion embedding")
    if len(keys) == 1 and not has("."):
        return FormatInfo("textual_inversion", "textual-inversion embedding (token -> vectors)")
    if has("model.diffusion_model."):
        return FormatInfo("checkpoint_ldm", "full model checkpoint (original LDM single-file layout)")
    if has("down_blocks.") and (has("resnets.") or has("attentions.")):
        return FormatInfo("checkpoint_diffusers", "full model weights (diffusers layout)")
    if has("transformer_blocks.") or has("double_blocks."):
        return FormatInfo("checkpoint_transformer", "full transformer weights")
    return FormatInfo("unknown", "unrecognised weights (no LoRA, embedding or checkpoint key pattern)")


def kohya_family(keys: list[str]):
    """The transformer family (a ``KohyaLayout``) whose original names a kohya file's ``lora_unet_`` keys use."""
    unet = sorted({k.split(".")[0][len("lora_unet_"):] for k in keys if k.startswith("lora_unet_")})
    return layout_for_kohya_names(unet) if unet else None


def adapter_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                         module_names: dict[str, list[str]] | None = None, unet_config=None,
                         family: str | None = None) -> LoraAdapter:
    """Any convertible LoRA file (diffusers or kohya) as a :class:`LoraAdapter`.

    ``module_names`` (role -> module paths of the target model) resolves kohya names exactly;
    ``unet_config`` (the target UNet's config) lets kohya files with original sgm block names be read;
    ``family`` (a family name) says which transformer naming a kohya file uses, if not recognisable.
    """
    fmt = detect_format(list(tensors), metadata)
    if fmt.name == "diffusers":
        return from_diffusers(tensors, metadata)
    if fmt.name == "kohya" and fmt.convertible:
        return kohya.from_kohya(tensors, metadata, module_names, family)
    if fmt.name == "kohya" and fmt.sgm and unet_config is not None:
        return kohya.from_kohya(kohya.sgm_to_diffusers_names(tensors, unet_config), metadata, module_names)
    if fmt.name == "kohya" and fmt.sgm:
        raise DifftuneError(f"{fmt.title}: reading original (sgm) block names needs the base model; pass --model PATH")
    hint = ""
    if fmt.name in ("kohya_loha", "kohya_lokr", "peft_loha", "peft_lokr", "peft_dora"):
        hint = "; reduce it to a plain LoRA first: difftune convert IN --to-lora --rank R -o OUT"
    raise DifftuneError(f"a LoRA was expected but this is {fmt.title}{hint}")
