"""How a transformer family's LoRA modules are named in kohya-format files (data only).

kohya sd-scripts, ComfyUI and Forge name a transformer's LoRA layers after the model's original
(reference-implementation) modules, not after diffusers' modules: Flux's ``double_blocks.0.img_attn.qkv``
is one fused linear where diffusers has ``transformer_blocks.0.attn.to_q``, ``to_k`` and ``to_v``. A
family lists each original module with the diffusers modules it holds, in the order their output rows
are stacked; ``difftune.adapters.kohya_fused`` does the arithmetic. UNet families need no table: their
kohya names are the diffusers names with ``.`` replaced by ``_``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KohyaModule:
    """One original module (``{i}`` stands for a block index) and the diffusers modules it fuses."""

    #: Original module path, e.g. ``double_blocks.{i}.img_attn.qkv``.
    original: str
    #: diffusers module paths whose output rows are stacked, in order, to form the original's output.
    parts: tuple[str, ...]
    #: Output rows of each part as a multiple of the module's input width (used to split a fused
    #: file back into parts, and for parts the LoRA does not train). ``None``: all parts equal.
    widths: tuple[int, ...] | None = None
    #: An adaLN modulation linear: with two chunks the original orders them (shift, scale) and
    #: diffusers (scale, shift), so the up matrix's row halves are swapped between the two.
    modulation: bool = False
    #: False where diffusers' kohya loader ignores the ``.alpha`` of this module; files then carry
    #: alpha = rank with the scale folded into the up matrix, which every loader reads the same.
    diffusers_reads_alpha: bool = True


@dataclass(frozen=True)
class KohyaNames:
    """A family's kohya naming: denoiser modules under ``lora_unet_``, text encoders by prefix."""

    modules: tuple[KohyaModule, ...]
    #: Kohya prefix of each text encoder's LoRA layers (pipeline attribute -> prefix).
    text_prefixes: dict[str, str] = field(default_factory=dict)
    #: diffusers' converter of this family's kohya files (``module.function``), or ``""`` if it has none.
    #: Used only to tell people which modules ``load_lora_weights`` would not load.
    diffusers_converter: str = ""


def modulation(original: str, part: str, **kwargs) -> KohyaModule:
    return KohyaModule(original, (part,), modulation=True, **kwargs)


def single(original: str, part: str) -> KohyaModule:
    return KohyaModule(original, (part,))
