"""Files that ComfyUI, Automatic1111 and Forge load as trained, and which tools a file is ready for.

The rules these tools apply to LoRA files are written down with their sources in ``docs/tools.md``.
In short:

- all three read kohya names (``lora_unet_...``, ``lora_te_``/``lora_te1_``/``lora_te2_`` with the
  ``text_model`` level) with ``.lora_down.weight`` / ``.lora_up.weight`` and scale each module by
  ``alpha / rank`` from its ``.alpha`` tensor, or by 1 when there is none;
- ComfyUI and Forge name transformer families (SD3, Flux) after their original modules; A1111 has no
  Flux and its SD3 reader fails on ``.alpha`` tensors, so it is not listed for them;
- a diffusers-format file half-loads: ComfyUI does not recognise the UNet attention keys
  (``attn1.to_q.lora_A.weight``) nor text-encoder keys without ``text_model.``, A1111 reads none of
  it, Forge refuses a file with more than 12 unmatched keys; and with no ``.alpha`` tensors (diffusers
  rejects them) every tool applies scale 1 where alpha != rank.

Which tools read a family is the family's ``lora_tools``; the file is named after them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from difftune.adapters.formats import LoraAdapter, recorded_modules
from difftune.errors import DifftuneError
from difftune.fileio import save_safetensors

TOOL_TITLES = {"comfyui": "ComfyUI", "a1111": "Automatic1111", "forge": "Forge"}
#: Folder of the embedding files for ComfyUI/A1111/Forge (the file name is the word used in prompts).
EMBEDDINGS_FOLDER = "embeddings_for_comfyui_a1111_forge"


def tool_file_name(tools: tuple[str, ...], kind: str = "lora") -> str:
    """``lora_for_comfyui_a1111_forge.safetensors``: the file name says which tools it is for."""
    return f"{kind}_for_{'_'.join(tools)}.safetensors"


def tools_title(tools: tuple[str, ...]) -> str:
    names = [TOOL_TITLES[t] for t in tools]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def variant_tools(family, variant: str) -> tuple[str, ...]:
    """The tools that load a run's adapter of this variant completely and as trained.

    DoRA: A1111 reads ``dora_scale`` per input column only, peft's magnitude is per output row, so A1111
    is left out; fused transformer modules have no DoRA layout at all. LoHa/LoKr of transformer
    families use ComfyUI's ``lycoris_`` names, which only ComfyUI maps for both SD3 and Flux.
    """
    transformer = family.kohya_names is not None
    if variant == "dora":
        return () if transformer else tuple(t for t in family.lora_tools if t != "a1111")
    if variant in ("loha", "lokr") and transformer:
        return ("comfyui",)
    return tuple(family.lora_tools)


def tool_header(family, adapter_meta: dict[str, str], kind: str) -> dict[str, str]:
    """Header of a tool file: difftune's entries plus the ``ss_*`` entries A1111's picker filters on.

    A1111 lists a LoRA under an SDXL (SD 2) model only if ``ss_base_model_version`` starts with ``sdxl_``
    (``ss_v2`` is ``"True"``); a file with any other metadata counts as SD 1.
    """
    header = {"format": "pt", **{k: v for k, v in adapter_meta.items() if k.startswith("difftune.")}}
    header.update(family.tool_metadata)
    header["ss_network_module"] = {"lora": "networks.lora", "dora": "networks.lora"}.get(kind, "lycoris.kohya")
    header["difftune.format"] = "kohya"
    header["difftune.tools"] = ",".join(variant_tools(family, kind))
    return header


# --- LoRA and DoRA --------------------------------------------------------------------------------


def lora_tool_tensors(adapter: LoraAdapter, family, magnitudes: dict[str, torch.Tensor] | None = None,
                      base_weights: dict[str, torch.Tensor] | None = None):
    """kohya tensors and header of ``adapter`` for the tools; family names the layout.

    ``magnitudes`` (DoRA, peft's per-output-row ``lora_magnitude_vector`` by module) adds a
    ``dora_scale`` per module; see :func:`dora_scale` for ``base_weights``.
    """
    from difftune.adapters import kohya

    tensors, header = kohya.to_kohya(adapter, family.name)
    if magnitudes:
        names = kohya.kohya_module_names(adapter, family.name)
        for module, base in names.items():
            if module not in magnitudes:
                continue
            m = adapter.modules[module]
            tensors[f"{base}.dora_scale"] = dora_scale(m, magnitudes[module], (base_weights or {}).get(module))
    return tensors, header


def dora_scale(m, magnitude: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """The ``dora_scale`` (shape ``[out, 1, ...]``) that gives peft's DoRA weight in ComfyUI and Forge.

    peft's weight is ``m * (W + dW) / ||W + dW||`` (norms per output row). ComfyUI and Forge
    (``weight_decompose``) divide an output-axis ``dora_scale`` by the row norms of the base weight
    ``W``, not of ``W + dW``; so the scale stored is ``m * ||W|| / ||W + dW||`` when the base weight is
    known, which makes their result peft's exactly. Without it the magnitude is stored as is.
    """
    mag = magnitude.detach().float().flatten()
    if base_weight is not None:
        w = base_weight.detach().double()
        merged = w + m.delta().reshape(w.shape)
        mag = (mag.double() * w.flatten(1).norm(dim=1) / merged.flatten(1).norm(dim=1)).float()
    return mag.reshape(-1, *([1] * (m.down.dim() - 1)))


def write_tool_file(tensors: dict[str, torch.Tensor], header: dict[str, str], out_dir: Path, family,
                    kind: str = "lora") -> Path:
    path = Path(out_dir) / tool_file_name(variant_tools(family, kind))
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path, header)
    return path


# --- LoHa and LoKr (LyCORIS layout) ----------------------------------------------------------------

_LYCORIS_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                     "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def lycoris_tool_tensors(state: dict[str, torch.Tensor], scales: dict[str, float], family) -> dict[str, torch.Tensor]:
    """peft LoHa/LoKr tensors (``role.path.hada_w1_a`` ...) in the LyCORIS layout the tools read.

    ``scales``: peft's ``alpha / r`` of each module (``role.path``).

    UNet families: ``lora_unet_<path with _>.hada_w1_a`` with ``.alpha``: the tools scale by alpha over
    the rank of ``hada_w1_b`` (LoHa) or of the decomposed LoKr factor (``lokr_w2_b``, else ``lokr_w1_b``),
    so alpha is written as peft's scale ``alpha / r`` times that rank. A LoKr with no decomposed factor
    has no rank in the tools' eyes (scale 1): the scale is folded into ``lokr_w1`` and no alpha written.
    Transformer families keep diffusers module paths under ``lycoris_`` (ComfyUI's SimpleTuner naming,
    read per q/k/v part of the fused modules).
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, suffix = key.rpartition(".")
        if suffix not in _LYCORIS_SUFFIXES:
            raise DifftuneError(f"{key}: not a LoHa/LoKr tensor")
        modules.setdefault(name, {})[suffix] = value
    out = {}
    for name, parts in sorted(modules.items()):
        role, path = name.split(".", 1)
        if role == "unet":
            base = "lora_unet_" + path.replace(".", "_")
        elif role == "transformer":
            base = "lycoris_" + path.replace(".", "_")
        else:
            raise DifftuneError(f"{name}: LoHa/LoKr tool files cover the denoiser only")
        scale = scales[name]
        if "lokr_w1" in parts or "lokr_w1_a" in parts:
            rank = _lokr_rank(parts)
            if rank is None:  # no decomposed factor: the tools apply scale 1, so it goes into lokr_w1
                parts = {**parts, "lokr_w1": parts["lokr_w1"] * scale}
            else:
                out[f"{base}.alpha"] = torch.tensor(float(scale * rank))
        else:
            out[f"{base}.alpha"] = torch.tensor(float(scale * parts["hada_w1_b"].shape[0]))
        out.update({f"{base}.{s}": v for s, v in parts.items()})
    return out


def _lokr_rank(parts: dict[str, torch.Tensor]) -> int | None:
    """The rank ComfyUI/A1111 divide alpha by: that of a decomposed ``lokr_w2`` (else ``lokr_w1``)."""
    if "lokr_w2_b" in parts:
        return int(parts["lokr_w2_b"].shape[0])
    if "lokr_w1_b" in parts:
        return int(parts["lokr_w1_b"].shape[0])
    return None


# --- embeddings --------------------------------------------------------------------------------------


def embedding_file_stem(token: str) -> str:
    """The prompt word of an embedding in A1111 (the file name) and ComfyUI (``embedding:NAME``)."""
    stem = re.sub(r"[^0-9A-Za-z_-]+", "", token)
    if not stem:
        raise DifftuneError(f"method.token: {token!r} leaves no file name for the ComfyUI/A1111 embedding file")
    return stem


def write_embedding_tool_file(rows: list[torch.Tensor], family, token: str, out_dir: Path,
                              metadata: dict[str, str]) -> Path:
    """``embeddings_for_comfyui_a1111_forge/<word>.safetensors``: one key per text encoder.

    ComfyUI takes the key of each tokenizer's ``embedding_key`` (``clip_l``, ``clip_g``, ``t5xxl``),
    else the first tensor; A1111 takes a file's only tensor, or ``clip_l`` and ``clip_g`` for SDXL.
    """
    keys = family.tool_embedding_keys
    if len(keys) != len(rows):
        raise DifftuneError(f"{family.title}: {len(rows)} text encoders but {len(keys)} embedding keys")
    folder = Path(out_dir) / EMBEDDINGS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{embedding_file_stem(token)}.safetensors"
    save_safetensors({k: r.float().contiguous() for k, r in zip(keys, rows, strict=True)}, path,
                     {"format": "pt", "difftune.token": token, **metadata})
    return path


# --- readiness (for inspect) -------------------------------------------------------------------------


@dataclass
class Readiness:
    tool: str
    #: ``ready`` (every key, trained scale), ``half`` (loads partly or at the wrong scale) or ``no``.
    status: str
    note: str

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def line(self) -> str:
        title = TOOL_TITLES[self.tool]
        if self.status == "ready":
            return f"{title}: ready ({self.note})"
        if self.status == "half":
            return f"warning: half-loads in {title}: {self.note}"
        return f"{title}: not loadable ({self.note})"


_UNET_ATTENTION = re.compile(r"\.attn[12]\.to_(q|k|v|out\.0)$")
_FIX = "use the run's lora_for_*.safetensors file, or `difftune convert FILE --to kohya -o OUT.safetensors`"


def readiness(keys: list[str], metadata: dict[str, str], fmt) -> list[Readiness]:
    """Per tool: whether a LoRA file loads completely and at the trained scale, with the reason if not."""
    from difftune.models import FAMILIES

    name = metadata.get("difftune.family") or fmt.family
    family = FAMILIES.get(name) if name in FAMILIES.names() else None
    if fmt.name in ("kohya", "kohya_loha", "kohya_lokr"):
        return _kohya_readiness(keys, metadata, fmt, family)
    if fmt.name in ("diffusers", "peft_dora", "peft_lokr", "peft_loha"):
        return _diffusers_readiness(keys, metadata)
    return []


def _kohya_readiness(keys, metadata, fmt, family) -> list[Readiness]:
    bases: dict[str, set[str]] = {}
    for k in keys:
        base, _, suffix = k.partition(".")
        bases.setdefault(base, set()).add(suffix)
    no_alpha = [b for b, s in bases.items() if "alpha" not in s]
    unequal = any(float(r[1]) != float(r[0]) for r in recorded_modules(metadata).values())
    if metadata.get("difftune.tools"):
        tools = tuple(metadata["difftune.tools"].split(","))
    elif family is not None:
        tools = family.lora_tools if not any(k.endswith(".dora_scale") for k in keys) else \
            tuple(t for t in family.lora_tools if t != "a1111")
    else:  # no family recorded: original transformer names are not read by A1111
        tools = ("comfyui", "forge") if fmt.family else tuple(TOOL_TITLES)
    out = []
    for tool in TOOL_TITLES:
        if tool not in tools:
            what = family.title if family is not None else fmt.family
            out.append(Readiness(tool, "no", f"it does not read this kind of {what} file as trained (docs/tools.md)"))
        elif no_alpha and unequal:
            out.append(Readiness(tool, "half", f"{len(no_alpha)} module(s) have no .alpha tensor and load at scale 1, "
                                               "but were trained with alpha != rank"))
        elif no_alpha:
            out.append(Readiness(tool, "ready", f"kohya names; {len(no_alpha)} module(s) without .alpha load at scale 1"))
        else:
            out.append(Readiness(tool, "ready", "kohya names, .alpha on every module (alpha / rank as trained)"))
    return out


def _diffusers_readiness(keys, metadata) -> list[Readiness]:
    bases = sorted({re.sub(r"\.(lora_[AB]\.weight|lora_magnitude_vector|hada_\w+|lokr_\w+)$", "", k) for k in keys})
    attention = [b for b in bases if b.startswith("unet.") and _UNET_ATTENTION.search(b)]
    te_flat = [b for b in bases if b.startswith("text_encoder") and ".text_model." not in b]
    unequal = sum(1 for r in recorded_modules(metadata).values() if float(r[1]) != float(r[0]))
    parts = []
    if attention or te_flat:
        parts.append(f"{len(attention) + len(te_flat)} of {len(bases)} modules are not recognised ({len(attention)} "
                     f"UNet attention projections named to_q/to_k/to_v/to_out.0, {len(te_flat)} text-encoder modules "
                     "without text_model.)")
    if unequal:
        parts.append(f"{unequal} module(s) have alpha != rank but no .alpha tensors (diffusers rejects them), so they "
                     "load at scale 1 instead of alpha / rank")
    if not parts:
        note = "diffusers names ComfyUI maps, at scale 1 (= alpha / rank here)"
        return [Readiness("comfyui", "ready", note), Readiness("forge", "ready", note),
                Readiness("a1111", "no", f"it reads kohya names only (SD3: attention only); {_FIX}")]
    note = "; ".join(parts) + f"; {_FIX}"
    return [Readiness("comfyui", "half", note),
            Readiness("a1111", "no", f"it reads kohya names only (SD3: attention only); {_FIX}"),
            Readiness("forge", "half", "it loads nothing from a file with more than 12 unmatched keys, else as "
                                       f"ComfyUI: {note}")]


# --- model card --------------------------------------------------------------------------------------


def card_usage(family, variant: str | None, tokens: list[str]) -> str:
    """Markdown steps for ComfyUI and Automatic1111/Forge, naming the files a run writes for them.

    ``variant``: the LoRA variant trained (``None``: no LoRA); ``tokens``: learnt placeholder tokens.
    ``{prompt}`` is left for the caller to fill.
    """
    lora_tools = variant_tools(family, variant) if variant else ()
    name = tool_file_name(lora_tools) if lora_tools else None
    words = [embedding_file_stem(t) for t in tokens]
    lines = []
    if variant and not lora_tools:
        lines += [f"No file for ComfyUI, Automatic1111 or Forge: a {variant} of {family.title}'s fused "
                  "transformer modules has no layout those tools read (see docs/tools.md); use diffusers.", ""]
    if "comfyui" in lora_tools or words:
        lines += ["### ComfyUI", ""]
        if name and "comfyui" in lora_tools:
            lines += [f"1. Copy `{name}` into `ComfyUI/models/loras/`.",
                      "2. Load the base model as usual, add a **Load LoRA** node (`LoraLoader`) after the model "
                      "loader, choose the file, leave `strength_model` and `strength_clip` at 1.0, and connect its "
                      "MODEL to the sampler and its CLIP to **CLIP Text Encode**."]
        if words:
            lines += [f"- Copy `{EMBEDDINGS_FOLDER}/{w}.safetensors` into `ComfyUI/models/embeddings/` and write "
                      f"`embedding:{w}` where the prompt has `{t}`." for w, t in zip(words, tokens, strict=True)]
        lines += ["", "Prompt: `{prompt}`" + (" (with the replacements above)" if words else ""), ""]
    webui = [t for t in ("a1111", "forge") if t in lora_tools]
    if webui or words:
        title = "Automatic1111 / Forge" if (webui == ["a1111", "forge"] or not lora_tools) else tools_title(tuple(webui))
        lines += [f"### {title}", ""]
        if name and webui:
            stem = name.removesuffix(".safetensors")
            lines += [f"1. Copy `{name}` into `stable-diffusion-webui/models/Lora/`.",
                      f"2. Select the base model as checkpoint and add `<lora:{stem}:1>` to the prompt."]
        if words:
            lines += [f"- Copy `{EMBEDDINGS_FOLDER}/{w}.safetensors` into `stable-diffusion-webui/embeddings/` and "
                      f"write `{w}` where the prompt has `{t}`." for w, t in zip(words, tokens, strict=True)]
        lines += [""]
    return "\n".join(lines)
