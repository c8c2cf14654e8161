"""LoRA adapters in one in-memory form, and the diffusers / peft file format.

Every format difftune reads or writes (diffusers/peft, kohya) converts to and from
:class:`LoraAdapter`: per module, a down matrix, an up matrix and the alpha it was trained
with. Keys are ``role.module_path`` where role is the pipeline attribute (``unet``,
``text_encoder``, ``text_encoder_2``, ``transformer``).
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field

import torch

from difftune.errors import DifftuneError

ADAPTER_META_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
MODULES_META_KEY = "difftune.modules"


@dataclass
class LoraModule:
    """One low-rank update: ``delta = (alpha / rank) * up @ down`` (conv kernels flattened)."""

    down: torch.Tensor  # [rank, in, *kernel]
    up: torch.Tensor  # [out, rank, *ones]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update, shaped like the target weight."""
        flat = self.up.flatten(1).double() @ self.down.flatten(1).double() * self.scale
        return flat.reshape(self.up.shape[0], *self.down.shape[1:])

    def delta_norm(self) -> float:
        """Frobenius norm of the update, from the small factors (no full matrix is formed)."""
        a, b = self.down.flatten(1).double(), self.up.flatten(1).double()
        return float(torch.sqrt(torch.clamp(torch.trace((a @ a.T) @ (b.T @ b)), min=0)) * abs(self.scale))


@dataclass
class LoraAdapter:
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)

    def roles(self) -> list[str]:
        return sorted({k.split(".", 1)[0] for k in self.modules})


# --- diffusers / peft format ------------------------------------------------------------------

#: Spellings of a module's down/up factors in diffusers files: peft's, and the ones
#: ``diffusers.utils.convert_state_dict_to_diffusers`` writes for attention and CLIP projections.
DOWN_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")
_UP_FOR_DOWN = {".lora_A.weight": ".lora_B.weight", ".lora.down.weight": ".lora.up.weight",
                ".lora_linear_layer.down.weight": ".lora_linear_layer.up.weight"}


def _peft_meta(metadata: dict[str, str]) -> dict[str, dict]:
    """Per-role LoraConfig kwargs from the ``lora_adapter_metadata`` header entry."""
    raw = metadata.get(ADAPTER_META_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise DifftuneError(f"header entry {ADAPTER_META_KEY!r} is not valid JSON") from None
    out: dict[str, dict] = collections.defaultdict(dict)
    for k, v in flat.items():
        role, _, name = k.partition(".")
        out[role][name] = v
    return out


def recorded_modules(metadata: dict[str, str]) -> dict[str, list]:
    """The ``difftune.modules`` header entry: ``{"role.path": [rank, alpha]}`` as difftune wrote it, or ``{}``."""
    raw = metadata.get(MODULES_META_KEY)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise DifftuneError(f"header entry {MODULES_META_KEY!r} is not valid JSON") from None


def alpha_for(role_config: dict, module_path: str, rank: int) -> float:
    """A module's alpha from its role's LoraConfig kwargs (pattern first, then lora_alpha, else rank)."""
    from peft.utils.other import get_pattern_key

    pattern = role_config.get("alpha_pattern") or {}
    if pattern:
        key = get_pattern_key(sorted(pattern, key=len, reverse=True), module_path)
        if key in pattern:
            return float(pattern[key])
    if role_config.get("lora_alpha") is not None:
        return float(role_config["lora_alpha"])
    return float(rank)


def from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str], strict: bool = True) -> LoraAdapter:
    """Read ``role.path.lora_A.weight`` / ``lora_B.weight`` pairs; alphas from the header, as trained.

    ``strict``: other tensors (DoRA magnitudes...) are an error; otherwise they are ignored.
    """
    configs = _peft_meta(metadata)
    recorded = recorded_modules(metadata)
    modules: dict[str, LoraModule] = {}
    left = set(tensors)
    for key in sorted(tensors):
        suffix = next((s for s in DOWN_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        name = key[: -len(suffix)]
        up_key = name + _UP_FOR_DOWN[suffix]
        if up_key not in tensors:
            raise DifftuneError(f"{name}: has a LoRA down weight but no up weight ({up_key})")
        down, up = tensors[key], tensors[up_key]
        if up.shape[1] != down.shape[0]:
            raise DifftuneError(f"{name}: lora_B has rank {up.shape[1]} but lora_A has rank {down.shape[0]}")
        role, _, path = name.partition(".")
        if name in recorded:
            alpha = float(recorded[name][1])
        elif f"{name}.alpha" in tensors:  # old diffusers files carry kohya-style alphas
            alpha = float(tensors[f"{name}.alpha"].item())
            left.discard(f"{name}.alpha")
        else:
            alpha = alpha_for(configs.get(role, {}), path, down.shape[0])
        modules[name] = LoraModule(down, up, alpha)
        left -= {key, up_key}
    if left and strict:
        extra = sorted(left)
        raise DifftuneError(
            f"{len(extra)} tensor(s) are not plain LoRA pairs (e.g. {extra[0]}); "
            "DoRA/LoHa/LoKr need `difftune convert --to-lora --rank R --model PATH`"
        )
    if not modules and strict:
        raise DifftuneError("no LoRA weights found (expected keys ending in .lora_A.weight and .lora_B.weight)")
    return LoraAdapter(modules, {k: v for k, v in metadata.items() if k.startswith("difftune.")})


def role_configs(adapter: LoraAdapter) -> dict[str, dict]:
    """LoraConfig kwargs per role that reproduce every module's rank and alpha exactly."""
    out = {}
    for role in adapter.roles():
        mods = {k.split(".", 1)[1]: m for k, m in adapter.modules.items() if k.split(".", 1)[0] == role}
        r = collections.Counter(m.rank for m in mods.values()).most_common(1)[0][0]
        alpha = collections.Counter(m.alpha for m in mods.values()).most_common(1)[0][0]
        out[role] = {
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {p: m.rank for p, m in mods.items() if m.rank != r},
            "alpha_pattern": {p: m.alpha for p, m in mods.items() if m.alpha != alpha},
            "target_modules": sorted(mods),
            "lora_dropout": 0.0,
            "use_dora": False,
            "lora_bias": False,
        }
    return out


def modules_metadata(adapter: LoraAdapter) -> str:
    """The ``difftune.modules`` header entry: ``{"role.path": [rank, alpha], ...}``."""
    return json.dumps({k: [m.rank, m.alpha] for k, m in sorted(adapter.modules.items())}, sort_keys=True)


def to_diffusers(adapter: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header for a file ``Pipeline.load_lora_weights`` reads with the exact alphas."""
    tensors = {}
    for name, m in adapter.modules.items():
        tensors[f"{name}.lora_A.weight"] = m.down
        tensors[f"{name}.lora_B.weight"] = m.up
    flat = {f"{role}.{k}": v for role, cfg in role_configs(adapter).items() for k, v in cfg.items()}
    header = {"format": "pt", ADAPTER_META_KEY: json.dumps(flat, sort_keys=True)}
    header.update(adapter.metadata)
    header[MODULES_META_KEY] = modules_metadata(adapter)
    return tensors, header
