"""How ComfyUI, Automatic1111 and Forge map LoRA file keys onto a model, written from their rules.

Our own statement of the rules listed in docs/tools.md (read from ComfyUI ``comfy/lora.py``,
``comfy/utils.py``, ``comfy/weight_adapter/``; A1111 ``extensions-builtin/Lora/networks.py``,
``network.py``, ``network_lora.py``; Forge ``backend/patcher/lora.py``,
``extensions-builtin/sd_forge_lora/networks.py``), not their code. A tool builds a key map from the
model it has loaded, ``{module name in a LoRA file: weight it patches}``; here the weights are named
by the diffusers module they are (``role.path``), or by their original name for transformer families.
"""

from __future__ import annotations

import re

import torch

CLIP_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
#: Which of ComfyUI's text encoders each pipeline attribute is, per family.
COMFY_CLIPS = {
    "sd1": {"text_encoder": "clip_l"},
    "sd2": {"text_encoder": "clip_h"},
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"},
    "flux": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
}
_BLOCK = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
#: diffusers UNet modules that ComfyUI's ``unet_to_diffusers`` map names (and so its ``lora_unet_`` keys).
COMFY_UNET_MODULES = [re.compile(p) for p in (
    _BLOCK + r"\.resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut|norm1|norm2)",
    _BLOCK + r"\.attentions\.\d+\.(proj_in|proj_out|norm)",
    _BLOCK + r"\.attentions\.\d+\.transformer_blocks\.\d+\.(norm[123]|attn[12]\.to_(q|k|v|out\.0)|ff\.net\.0\.proj|ff\.net\.2)",
    r"down_blocks\.\d+\.downsamplers\.0\.conv", r"up_blocks\.\d+\.upsamplers\.0\.conv",
    r"(class_embedding|add_embedding|time_embedding)\.linear_[12]", r"conv_in|conv_out|conv_norm_out",
)]


def weight_modules(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


# --- ComfyUI (and Forge, which carries ComfyUI's rules) ---------------------------------------------------


def comfy_unet_keys(unet: torch.nn.Module) -> dict[str, str]:
    """``lora_unet_<diffusers path>`` and the diffusers-format spellings ComfyUI maps, -> ``unet.path``."""
    out = {}
    for path in weight_modules(unet):
        if not any(p.fullmatch(path) for p in COMFY_UNET_MODULES):
            continue
        out["lora_unet_" + path.replace(".", "_")] = f"unet.{path}"
        diffusers = path.replace(".to_", ".processor.to_")
        diffusers = diffusers[:-2] if diffusers.endswith(".to_out.0") else diffusers
        for prefix in ("", "unet."):
            out[prefix + diffusers] = f"unet.{path}"
    return out


def comfy_clip_keys(family: str, encoders: dict[str, torch.nn.Module], forge: bool = False) -> dict[str, str]:
    """Text-encoder keys: ``lora_te*_text_model_encoder_layers_N_<module>`` for the six CLIP layer
    modules of layers < 32, ``text_encoder*.text_model.encoder.layers.N.<module>`` (diffusers), T5 by index."""
    clips = COMFY_CLIPS[family]
    present = set(clips.values())
    out = {}
    for role, kind in clips.items():
        if role not in encoders:
            continue
        for path in weight_modules(encoders[role]):
            bare = path.removeprefix("text_model.")
            if kind == "t5xxl":
                index = 1 + ("clip_g" in present) + ("clip_l" in present)
                names = [f"lora_te{index}_{bare.replace('.', '_')}"]
                if "clip_l" in present and "clip_g" not in present:
                    names.append(f"lora_te2_{bare.replace('.', '_')}")  # OneTrainer's Flux naming
                if forge:
                    names += [f"lora_te{i}_{bare.replace('.', '_')}" for i in (1, 2, 3)]
                out.update({n: f"{role}.{path}" for n in names})
                continue
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", bare)
            if not m or m[2] not in CLIP_MODULES or int(m[1]) >= 32:
                continue
            flat = f"text_model_encoder_layers_{m[1]}_{m[2].replace('.', '_')}"
            if kind in ("clip_l", "clip_h"):
                names = [f"lora_te_{flat}", f"lora_te1_{flat}", f"text_encoder.text_model.{bare}"]
            elif "clip_l" in present:
                names = [f"lora_te2_{flat}", f"text_encoder_2.text_model.{bare}"]
            else:
                names = [f"lora_te_{flat}", f"text_encoder.text_model.{bare}"]
            out.update({n: f"{role}.{path}" for n in names})
    return out


def original_keys(family: str, layer_keys: list[str]) -> set[str]:
    """The original (SAI / BFL) weight names of a transformer with the layers named in ``layer_keys``.

    Recorded from the names diffusers' own original-to-diffusers converter asks for.
    """
    from diffusers.loaders import single_file_utils as sfu

    class Recorder(dict):
        def __init__(self, seed):
            super().__init__({k: torch.zeros(21504) for k in seed})
            self.asked = set()

        def pop(self, key, *default):
            self.asked.add(key)
            return super().pop(key) if key in self else torch.zeros(21504)

        def __getitem__(self, key):
            self.asked.add(key)
            return super().__getitem__(key) if key in self else torch.zeros(21504)

    ckpt = Recorder(layer_keys)
    convert = {"sd3": sfu.convert_sd3_transformer_checkpoint_to_diffusers,
               "flux": sfu.convert_flux_transformer_checkpoint_to_diffusers}[family]
    convert(ckpt)
    return {k for k in ckpt.asked if k.endswith(".weight")}


def comfy_transformer_keys(family: str, layer_keys: list[str]) -> dict[str, str]:
    """``lora_unet_<original weight name without .weight>``: ComfyUI maps every weight of the model."""
    return {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k[: -len(".weight")]
            for k in original_keys(family, layer_keys)}


def comfy_apply(tensors: dict[str, torch.Tensor], key_map: dict[str, str]):
    """What ComfyUI's ``load_lora`` takes from a file: ``{target: (up, down, alpha or None, dora_scale)}``
    for LoRA modules, LoHa/LoKr factors as dicts, and the keys it leaves out ("lora key not loaded")."""
    patches, loaded = {}, set()
    for name, target in key_map.items():
        alpha = tensors.get(f"{name}.alpha")
        dora = tensors.get(f"{name}.dora_scale")
        for up, down in (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"),
                         ("lora.up.weight", "lora.down.weight")):
            if f"{name}.{up}" in tensors:
                patches[target] = ("lora", tensors[f"{name}.{up}"], tensors[f"{name}.{down}"], alpha, dora)
                loaded |= {f"{name}.{up}", f"{name}.{down}"}
        if f"{name}_lora.up.weight" in tensors:  # old diffusers attention-processor spelling
            patches[target] = ("lora", tensors[f"{name}_lora.up.weight"], tensors[f"{name}_lora.down.weight"], alpha, dora)
            loaded |= {f"{name}_lora.up.weight", f"{name}_lora.down.weight"}
        lyco = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")
                and k.rsplit(".", 1)[1].startswith(("hada_", "lokr_"))}
        if lyco:
            patches[target] = ("lycoris", lyco, alpha, dora)
            loaded |= {f"{name}.{s}" for s in lyco}
        loaded |= {k for k in (f"{name}.alpha", f"{name}.dora_scale") if k in tensors}
    return patches, sorted(set(tensors) - loaded)


def comfy_delta(patch, base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight change ComfyUI applies: ``(alpha / rank) * up @ down`` (scale 1 without alpha), DoRA's
    ``weight_decompose`` (output-axis scale: divided by the base weight's row norms), LoHa and LoKr."""
    kind = patch[0]
    if kind == "lora":
        _, up, down, alpha, dora = patch
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        diff = (up.flatten(1).double() @ down.flatten(1).double()) * scale
    else:
        _, f, alpha, dora = patch
        if "hada_w1_a" in f:
            scale = float(alpha) / f["hada_w1_b"].shape[0] if alpha is not None else 1.0
            diff = (f["hada_w1_a"].double() @ f["hada_w1_b"].double()) * (f["hada_w2_a"].double() @ f["hada_w2_b"].double())
        else:
            dim = None
            w1 = f.get("lokr_w1")
            if w1 is None:
                dim, w1 = f["lokr_w1_b"].shape[0], f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f.get("lokr_w2")
            if w2 is None:
                dim, w2 = f["lokr_w2_b"].shape[0], f["lokr_w2_a"] @ f["lokr_w2_b"]
            scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
            diff = torch.kron(w1.double(), w2.double())
        diff = diff * scale
    if base_weight is None or patch[-1] is None:
        return diff
    w = base_weight.double().flatten(1)
    dora = patch[-1].double()
    merged = w + diff
    if dora.shape[0] == w.shape[0]:
        norm = w.norm(dim=1, keepdim=True)
    else:
        norm = merged.norm(dim=0, keepdim=True)
    return merged * (dora.reshape(dora.shape[0], -1) / norm) - w


# --- Automatic1111 ---------------------------------------------------------------------------------------

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_name(key: str, sd2: bool) -> str:
    """A1111's ``convert_diffusers_name_to_compvis`` for one module name (three entries per block)."""
    if m := re.fullmatch(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.fullmatch(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.fullmatch(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    for kind, base in (("down", lambda b, i: 1 + b * 3 + i), ("up", lambda b, i: b * 3 + i)):
        if m := re.fullmatch(rf"lora_unet_{kind}_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
            suffix = _RESNET.get(m[4], m[4]) if m[2] == "resnets" else m[4]
            where = "input" if kind == "down" else "output"
            return f"diffusion_model_{where}_blocks_{base(int(m[1]), int(m[3]))}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = _RESNET.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix}"
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if not sd2:
            return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
        return f"model_transformer_resblocks_{m[1]}_" + _open_clip(m[2])
    if m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"1_model_transformer_resblocks_{m[1]}_" + _open_clip(m[2])
    return key


def _open_clip(rest: str) -> str:
    return rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")


def a1111_resolve(key: str, modules: dict[str, str], sd2: bool) -> str | None:
    """The model module A1111's ``load_network`` attaches a file's module to, or None (not matched)."""
    name = a1111_name(key, sd2)
    if name in modules:
        return modules[name]
    if m := re.fullmatch(r"(.*)_([qkv]_proj)$", name):  # q/k/v of a fused MultiheadAttention
        if m[1] in modules:
            return f"{modules[m[1]]}:{m[2][0]}"
    if "lora_unet" in key:
        return modules.get(key.replace("lora_unet", "diffusion_model"))
    if "lora_te1_text_model" in key:
        return (modules.get(key.replace("lora_te1_text_model", "0_transformer_text_model"))
                or modules.get(key.replace("lora_te1_text_model", "transformer_text_model")))
    return None


def a1111_modules(unet: torch.nn.Module, encoders: dict[str, torch.nn.Module], family: str) -> dict[str, str]:
    """A1111's module names (``network_layer_mapping``) of an SD 1/2/XL model -> our ``role.path``.

    The UNet is the original LDM one (``diffusion_model_input_blocks_...``), named here through
    difftune's own diffusers -> LDM converter; CLIP-L is transformers' model one level down
    (``transformer_text_model_...``), OpenCLIP keeps q/k/v in one ``attn`` (MultiheadAttention).
    """
    from difftune.models.sd_single_file import unet_to_ldm

    label_emb = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL
    paths = [p for p in weight_modules(unet) if p not in label_emb]
    ldm = unet_to_ldm({f"{p}.weight": torch.zeros(1) for p in paths}, unet.config)
    by_ldm = {k[: -len(".weight")]: p for k, p in zip(ldm, paths, strict=True)}
    by_ldm.update({v: k for k, v in label_emb.items() if k in dict(unet.named_modules())})
    out = {"diffusion_model_" + k.replace(".", "_"): f"unet.{p}" for k, p in by_ldm.items()}
    clip_prefix = {"sd1": {"text_encoder": "transformer_"}, "sdxl": {"text_encoder": "0_transformer_"}}[family] \
        if family != "sd2" else {}
    open_clip = {"sd2": {"text_encoder": "model_"}, "sdxl": {"text_encoder_2": "1_model_"}}.get(family, {})
    for role, enc in encoders.items():
        for path in weight_modules(enc):
            bare = "text_model." + path.removeprefix("text_model.")
            if role in clip_prefix:
                out[clip_prefix[role] + bare.replace(".", "_")] = f"{role}.{path}"
            elif role in open_clip and (m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", bare)):
                rest = {"self_attn.out_proj": "attn_out_proj", "mlp.fc1": "mlp_c_fc", "mlp.fc2": "mlp_c_proj"}.get(m[2])
                layer = f"{open_clip[role]}transformer_resblocks_{m[1]}_"
                if rest:
                    out[layer + rest] = f"{role}.{path}"
                elif m[2] == "self_attn.q_proj":  # the fused attention module; q/k/v resolve to it
                    out[layer + "attn"] = f"{role}.{path.removesuffix('.q_proj')}"
    return out
