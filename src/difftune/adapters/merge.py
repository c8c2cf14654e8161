"""``difftune merge``: several weighted LoRAs as one — exactly (ranks concatenated) or reduced by SVD.

Exact merge: for each module, ``down`` factors are stacked and ``up`` factors concatenated with
each adapter's ``weight * alpha / rank`` folded into its ``up``; the result has alpha = rank, so
``up @ down`` equals the weighted sum of the updates exactly.

Reduced merge (``rank``): the summed update ``U @ D`` is factorised through QR of both factors and
an SVD of the small core, keeping the top ``rank`` singular values; the relative Frobenius error
of what is dropped is reported per module and overall.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from difftune.adapters.formats import LoraAdapter, LoraModule
from difftune.errors import DifftuneError


@dataclass
class MergeReport:
    #: Per module: relative Frobenius error ``||delta - approx|| / ||delta||``.
    module_errors: dict[str, float] = field(default_factory=dict)
    overall_error: float = 0.0


def _flat(m: LoraModule, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in*k]) in float64 with ``weight * alpha / rank`` folded into ``up``."""
    return m.up.flatten(1).double() * (weight * m.scale), m.down.flatten(1).double()


def concat_merge(adapters: list[tuple[LoraAdapter, float]]) -> LoraAdapter:
    if not adapters:
        raise DifftuneError("merge: give at least one adapter")
    names = sorted({k for a, _ in adapters for k in a.modules})
    out: dict[str, LoraModule] = {}
    for name in names:
        parts = [(a.modules[name], w) for a, w in adapters if name in a.modules]
        shapes = {(m.up.shape[0], *m.down.shape[1:]) for m, _ in parts}
        if len(shapes) > 1:
            raise DifftuneError(f"merge: {name} has different shapes in the adapters ({sorted(shapes)}); "
                                "they were made for different models")
        ups, downs = zip(*(_flat(m, w) for m, w in parts), strict=True)
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
        out[name] = _module(up, down, parts[0][0])
    meta = dict(adapters[0][0].metadata)
    meta["difftune.merged_from"] = str(len(adapters))
    return LoraAdapter(out, meta)


def _module(up: torch.Tensor, down: torch.Tensor, like: LoraModule) -> LoraModule:
    r = down.shape[0]
    dtype = like.down.dtype if like.down.is_floating_point() else torch.float32
    dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return LoraModule(
        down=down.reshape(r, *like.down.shape[1:]).to(dtype).contiguous(),
        up=up.reshape(up.shape[0], r, *like.up.shape[2:]).to(dtype).contiguous(),
        alpha=float(r),
    )


def svd_reduce(adapter: LoraAdapter, rank: int) -> tuple[LoraAdapter, MergeReport]:
    """Every module reduced to at most ``rank`` by truncated SVD of its update (alpha = rank)."""
    if rank < 1:
        raise DifftuneError(f"--rank must be at least 1 (got {rank})")
    report = MergeReport()
    out: dict[str, LoraModule] = {}
    dropped_sq = total_sq = 0.0
    for name, m in adapter.modules.items():
        up, down = _flat(m, 1.0)
        q_up, r_up = torch.linalg.qr(up)
        q_down, r_down = torch.linalg.qr(down.T)
        u, s, vh = torch.linalg.svd(r_up @ r_down.T)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        new_up = (q_up @ u[:, :k]) * root
        new_down = root[:, None] * (vh[:k] @ q_down.T)
        kept, full = float((s[:k] ** 2).sum()), float((s ** 2).sum())
        report.module_errors[name] = math.sqrt(max(full - kept, 0.0) / full) if full > 0 else 0.0
        dropped_sq += max(full - kept, 0.0)
        total_sq += full
        out[name] = _module(new_up, new_down, m)
    report.overall_error = math.sqrt(dropped_sq / total_sq) if total_sq > 0 else 0.0
    return LoraAdapter(out, dict(adapter.metadata)), report


def reduce_deltas(deltas: dict[str, torch.Tensor], rank: int, metadata: dict[str, str] | None = None
                  ) -> tuple[LoraAdapter, MergeReport]:
    """Full weight updates (any method: DoRA, LoHa, LoKr...) as a plain LoRA of at most ``rank``."""
    if rank < 1:
        raise DifftuneError(f"--rank must be at least 1 (got {rank})")
    report = MergeReport()
    out: dict[str, LoraModule] = {}
    dropped_sq = total_sq = 0.0
    for name, delta in deltas.items():
        flat = delta.flatten(1).double()
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        up, down = u[:, :k] * root, root[:, None] * vh[:k]
        kept, full = float((s[:k] ** 2).sum()), float((s ** 2).sum())
        report.module_errors[name] = math.sqrt(max(full - kept, 0.0) / full) if full > 0 else 0.0
        dropped_sq += max(full - kept, 0.0)
        total_sq += full
        like = LoraModule(torch.empty(k, *delta.shape[1:]), torch.empty(delta.shape[0], k, *([1] * (delta.dim() - 2))), k)
        out[name] = _module(up, down, like)
    report.overall_error = math.sqrt(dropped_sq / total_sq) if total_sq > 0 else 0.0
    return LoraAdapter(out, dict(metadata or {})), report


def report_metadata(report: MergeReport) -> dict[str, str]:
    """Header entries recording the SVD error: overall and per module."""
    return {"difftune.svd_error": f"{report.overall_error:.6g}",
            "difftune.svd_errors": json.dumps({k: round(v, 8) for k, v in report.module_errors.items()},
                                              sort_keys=True)}


def format_report(report: MergeReport, limit: int = 20) -> str:
    worst = sorted(report.module_errors.items(), key=lambda kv: -kv[1])
    lines = [f"SVD approximation: overall relative Frobenius error {report.overall_error:.3e} "
             f"over {len(worst)} modules; worst modules:"]
    lines += [f"  {err:.3e}  {name}" for name, err in worst[:limit]]
    if len(worst) > limit:
        lines.append(f"  ... {len(worst) - limit} more (all listed in the output header difftune.svd_errors)")
    return "\n".join(lines)


def fuse_into(pipe, adapter: LoraAdapter) -> int:
    """Add each module's update to the pipeline's base weights in place; return the number fused."""
    fused = 0
    with torch.no_grad():
        for name, m in adapter.modules.items():
            role, path = name.split(".", 1)
            try:
                module = getattr(pipe, role).get_submodule(path)
            except AttributeError:
                raise DifftuneError(f"--fuse: {name} does not exist in this model") from None
            w = module.weight
            delta = m.delta()
            if delta.shape != w.shape:
                raise DifftuneError(f"--fuse: {name}: update shape {tuple(delta.shape)} != weight {tuple(w.shape)}")
            w.add_(delta.to(w.dtype))
            fused += 1
    return fused
