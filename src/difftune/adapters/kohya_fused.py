"""kohya LoRA names for transformer families: diffusers modules fused into the original ones and back.

A family's :class:`~difftune.models.kohya_names.KohyaNames` says which diffusers modules make up each
original module (Flux ``double_blocks.0.img_attn.qkv`` = ``to_q``, ``to_k``, ``to_v`` stacked by rows).

Fusing is exact. For parts with ranks r_j, alphas a_j and scales s_j = a_j / r_j, the fused LoRA has
``down = cat(down_j)`` (rank R = sum r_j), ``up`` block-diagonal in the ``up_j`` and alpha ``s·R`` with
s = s_1, so each block's update ``s · up_j · down_j`` equals the part's own; a part with a different
scale has ``s_j / s`` folded into its up block. Equal parts (the usual case) give rank 3r and alpha 3a
for q/k/v, bit-for-bit the same factors. diffusers' Flux loader reads such a file exactly: it recognises
the block-diagonal up and chunks the down (equal ranks), or else gives every part the whole down.

Splitting back uses the ``difftune.modules`` header entry that difftune writes (each part's rank and
alpha) when present; otherwise it takes the columns each part's rows use when these are disjoint,
else it gives every part the shared down (exact, at rank R).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from difftune.adapters.formats import LoraModule
from difftune.errors import DifftuneError

#: Prefix of denoiser modules in kohya files.
UNET_PREFIX = "lora_unet"


@dataclass
class _Match:
    module: object  # KohyaModule
    index: str | None  # the block index filling ``{i}``, if any
    part: int  # which part of the module


def _pattern(template: str, sep: str) -> re.Pattern:
    text = re.escape(template.replace(".", sep)).replace(r"\{i\}", r"(\d+)")
    return re.compile(f"^{text}$")


def _fill(template: str, index: str | None) -> str:
    return template.replace("{i}", index) if index is not None else template


class KohyaLayout:
    """The kohya naming of one transformer family, with lookups in both directions."""

    def __init__(self, names, family_name: str, family_title: str) -> None:
        self.names = names
        self.family = family_name
        self.title = family_title
        self._by_part = [(_pattern(p, "."), m, j) for m in names.modules for j, p in enumerate(m.parts)]
        self._by_flat = [(_pattern(m.original, "_"), m) for m in names.modules]

    # --- naming ----------------------------------------------------------------------------------

    def locate(self, path: str) -> _Match | None:
        """The original module a diffusers module path belongs to."""
        for pattern, module, j in self._by_part:
            hit = pattern.match(path)
            if hit:
                return _Match(module, hit.group(1) if pattern.groups else None, j)
        return None

    def parse(self, flat: str):
        """(KohyaModule, block index) for a flattened original name such as ``double_blocks_0_img_attn_qkv``."""
        for pattern, module in self._by_flat:
            hit = pattern.match(flat)
            if hit:
                return module, hit.group(1) if pattern.groups else None
        return None

    def recognises(self, flat_names: list[str]) -> bool:
        """True if every flattened denoiser name is one of this family's original modules."""
        return bool(flat_names) and all(self.parse(n) for n in flat_names)

    def unmapped(self, paths: list[str]) -> list[str]:
        return [p for p in paths if self.locate(p) is None]

    def text_prefix(self, role: str) -> str | None:
        return self.names.text_prefixes.get(role)

    def role_for_prefix(self, prefix: str) -> str | None:
        return next((r for r, p in self.names.text_prefixes.items() if p == prefix), None)

    # --- diffusers -> kohya ------------------------------------------------------------------------

    def fuse(self, modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
        """Denoiser LoRA modules (diffusers paths) -> kohya modules (flattened original names)."""
        groups: dict[tuple[str, str | None], tuple[object, dict[int, tuple[str, LoraModule]]]] = {}
        for path, m in modules.items():
            hit = self.locate(path)
            if hit is None:
                raise DifftuneError(
                    f"transformer.{path}: no {self.title} kohya name is known for this module "
                    "(kohya loaders name only the original model's modules)"
                )
            key = (hit.module.original, hit.index)
            groups.setdefault(key, (hit.module, {}))[1][hit.part] = (path, m)
        out = {}
        for (original, index), (module, parts) in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            flat = _fill(original, index).replace(".", "_")
            fused = _fuse_parts(module, parts, flat)
            if module.modulation:
                fused = LoraModule(fused.down, _swap_halves_if_two_chunks(fused.up, fused.down), fused.alpha)
            if not module.diffusers_reads_alpha and fused.alpha != fused.rank:
                fused = LoraModule(fused.down, fused.up * fused.scale, float(fused.rank))
            out[flat] = fused
        return out

    # --- kohya -> diffusers ------------------------------------------------------------------------

    def split(self, flat: str, fused: LoraModule, recorded: dict[str, list]) -> dict[str, LoraModule]:
        """One kohya module -> diffusers modules. ``recorded``: ``role.path -> [rank, alpha]`` from the header."""
        parsed = self.parse(flat)
        if parsed is None:
            raise DifftuneError(f"{UNET_PREFIX}_{flat}: not a {self.title} module name in kohya files")
        module, index = parsed
        paths = [_fill(p, index) for p in module.parts]
        up = _swap_halves_if_two_chunks(fused.up, fused.down) if module.modulation else fused.up
        if len(paths) == 1:
            out = {paths[0]: LoraModule(fused.down, up, fused.alpha)}
        else:
            out = _split_parts(module, paths, LoraModule(fused.down, up, fused.alpha), recorded, flat)
        return {path: _recorded_alpha(m, recorded.get(f"transformer.{path}")) for path, m in out.items()}

    def diffusers_gaps(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """What diffusers' own kohya loader for this family would not load from ``tensors``, for a note.

        Runs diffusers' converter on the tensors (no model needed) and lists the denoiser modules it
        leaves out. ``None`` if everything converts.
        """
        if not self.names.diffusers_converter:
            return f"diffusers has no reader for {self.title} kohya files (ComfyUI, Forge and sd-scripts read them)"
        import importlib

        module_name, func_name = self.names.diffusers_converter.rsplit(".", 1)
        try:
            converted = getattr(importlib.import_module(module_name), func_name)(dict(tensors))
        except (AssertionError, ValueError, KeyError, RuntimeError) as exc:
            return f"diffusers' {self.title} kohya reader cannot read it ({type(exc).__name__}: {exc or 'shape check'})"
        loaded = {k.rsplit(".lora_", 1)[0] for k in converted}
        missing = []
        for key in tensors:
            if not (key.startswith(UNET_PREFIX + "_") and key.endswith(".lora_down.weight")):
                continue
            flat = key[len(UNET_PREFIX) + 1: -len(".lora_down.weight")]
            module, index = self.parse(flat)
            if any(f"transformer.{_fill(p, index)}" not in loaded for p in module.parts):
                missing.append(f"{UNET_PREFIX}_{flat}")
        if not missing:
            return None
        return (f"diffusers' {self.title} kohya reader skips {len(missing)} module(s) of this file: "
                + ", ".join(sorted(missing)) + " (ComfyUI, Forge and sd-scripts read them)")


def _split_parts(module, paths: list[str], fused: LoraModule, recorded: dict[str, list], flat: str):
    blocks = list(torch.split(fused.up, _row_widths(module, fused, flat), dim=0))
    ranks = [recorded.get(f"transformer.{p}", [None])[0] for p in paths]
    columns = _recorded_columns(ranks, fused.rank) or _disjoint_columns(blocks)
    out = {}
    for j, (path, block) in enumerate(zip(paths, blocks, strict=True)):
        if columns is None:  # a genuinely fused LoRA: every part shares the whole down
            out[path] = LoraModule(fused.down, block.contiguous(), fused.alpha)
        elif columns[j]:  # (parts without columns were not trained)
            cols = columns[j]
            out[path] = LoraModule(fused.down[cols].contiguous(), block[:, cols].contiguous(), fused.scale * len(cols))
    return out


def _recorded_alpha(m: LoraModule, rec: list | None) -> LoraModule:
    """The module with the alpha difftune recorded for it (same update: the up matrix absorbs the ratio)."""
    if rec is None or int(rec[0]) != m.rank or float(rec[1]) == m.alpha:
        return m
    alpha = float(rec[1])
    return LoraModule(m.down, m.up * (m.scale / (alpha / m.rank)), alpha)


def _fuse_parts(module, parts: dict[int, tuple[str, LoraModule]], flat: str) -> LoraModule:
    if len(module.parts) == 1:
        return parts[0][1]
    present = [parts[j][1] for j in sorted(parts)]
    ins = {tuple(m.down.shape[1:]) for m in present}
    if len(ins) != 1:
        raise DifftuneError(f"{flat}: its parts {', '.join(p for p, _ in parts.values())} take inputs of "
                            "different widths, so they cannot be one fused module")
    width = present[0].down.shape[1]
    first = present[0]
    rows = []
    for j in range(len(module.parts)):
        if j in parts:
            rows.append(parts[j][1].up.shape[0])
        elif module.widths is not None:
            rows.append(module.widths[j] * width)
        else:
            rows.append(first.up.shape[0])
    scale = first.scale
    rank = sum(m.rank for m in present)
    dtype = first.up.dtype
    up = torch.zeros((sum(rows), rank, *first.up.shape[2:]), dtype=dtype)
    row = col = 0
    for j, n in enumerate(rows):
        if j in parts:
            m = parts[j][1]
            block = m.up if m.scale == scale else m.up * (m.scale / scale)
            up[row:row + n, col:col + m.rank] = block
            col += m.rank
        row += n
    down = torch.cat([m.down for m in present], dim=0)
    return LoraModule(down, up, scale * rank)


def _row_widths(module, fused: LoraModule, flat: str) -> list[int]:
    out_rows, width = fused.up.shape[0], fused.down.shape[1]
    if module.widths is None:
        n = len(module.parts)
        if out_rows % n:
            raise DifftuneError(f"{flat}: {out_rows} output rows do not split into {n} equal parts")
        return [out_rows // n] * n
    rows = [w * width for w in module.widths]
    if sum(rows) != out_rows:
        raise DifftuneError(f"{flat}: expected {sum(rows)} output rows ({'+'.join(map(str, rows))}) for input width "
                            f"{width}, found {out_rows}")
    return rows


def _recorded_columns(ranks: list[int | None], total: int) -> list[list[int]] | None:
    """Column ranges from the recorded part ranks (parts not recorded were not trained)."""
    if all(r is None for r in ranks) or sum(r or 0 for r in ranks) != total:
        return None
    out, start = [], 0
    for r in ranks:
        r = int(r or 0)
        out.append(list(range(start, start + r)))
        start += r
    return out


def _disjoint_columns(blocks: list[torch.Tensor]) -> list[list[int]] | None:
    used = [torch.nonzero(b.flatten(2).abs().sum(dim=(0, 2)) if b.dim() > 2 else b.abs().sum(dim=0)).flatten().tolist()
            for b in blocks]
    if not any(used):
        return None
    seen: set[int] = set()
    for cols in used:
        if seen & set(cols):
            return None
        seen |= set(cols)
    return used


def _swap_halves_if_two_chunks(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) for a modulation linear with two chunks (out = 2 × in)."""
    if up.shape[0] != 2 * down.shape[1]:
        return up
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


@functools.lru_cache(maxsize=1)
def layouts() -> tuple[KohyaLayout, ...]:
    """The kohya layouts of every registered family that has one."""
    from difftune.models import FAMILIES

    out = []
    for name in FAMILIES.names():
        cls = FAMILIES.get(name)
        if cls.kohya_names is not None:
            out.append(KohyaLayout(cls.kohya_names, name, cls.title))
    return tuple(out)


def layout_for_family(name: str | None) -> KohyaLayout | None:
    """The layout of family ``name``; ``None`` for families named like diffusers (and unknown names)."""
    if not name:
        return None
    return next((lay for lay in layouts() if lay.family == name), None)


def layout_for_kohya_names(flat_names: list[str]) -> KohyaLayout | None:
    """The family whose original module names these flattened ``lora_unet_`` names are, if any."""
    hits = [lay for lay in layouts() if lay.recognises(flat_names)]
    return hits[0] if len(hits) == 1 else None


def layout_for_modules(paths: list[str]) -> KohyaLayout:
    """The family whose kohya names cover every transformer module path; an error if none or several."""
    fits = [lay for lay in layouts() if not lay.unmapped(paths)]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise DifftuneError(
            "kohya export: these transformer modules match no family's kohya names (e.g. "
            f"transformer.{paths[0]}); pass --family or --model"
        )
    raise DifftuneError(
        "kohya export: this transformer LoRA fits the kohya names of several families ("
        + ", ".join(lay.family for lay in fits) + "), which name the same modules differently; "
        "pass --family NAME or --model PATH"
    )
