"""``difftune data check``: a pre-flight report on a dataset, as text or JSON."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict

from difftune.config.resolve import at_resolution, resolutions
from difftune.config.schema import DataConfig
from difftune.data.buckets import bucket_label, make_buckets, nearest_bucket
from difftune.data.captions import final_caption
from difftune.data.probe import Problem
from difftune.data.sources import scan

CLIP_LIMIT = 77
_WORDS = re.compile(r"\w+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """A CLIP-style estimate: one token per word or punctuation mark, plus start and end tokens."""
    return len(_WORDS.findall(text)) + 2


def token_counter(tokenizers: list) -> tuple:
    """``(count(text) -> int, limit, description)`` from real tokenizers, or the CLIP-style estimate."""
    if not tokenizers:
        return estimate_tokens, CLIP_LIMIT, (f"estimated, CLIP-style {CLIP_LIMIT}-token limit; pass a run config "
                                             "to count with the model's tokenizer")
    limit = min(int(t.model_max_length) for t in tokenizers)

    def count(text: str) -> int:
        return max(len(t(text, truncation=False).input_ids) for t in tokenizers)

    return count, limit, f"counted with the model's tokenizer, limit {limit} tokens"


def folder_config(folder: str, overrides: list[str] | None = None):
    """The config ``data check FOLDER`` reports on: the folder as ``data.path``, ``--set`` overrides applied."""
    from difftune.config.loader import parse_config

    return parse_config(data={"model": {"path": "unused"}, "data": {"path": folder}}, overrides=overrides,
                        check_paths=False)


def check_dataset(cfg: DataConfig, tokenizers: list | None = None) -> dict:
    """Everything ``data check`` reports, as a JSON-ready mapping."""
    result = scan(cfg)
    cfg = at_resolution(cfg, resolutions(cfg)[0])  # the report's buckets are those of the first resolution
    problems: list[Problem] = list(result.problems)
    count, limit, how = token_counter(tokenizers or [])
    buckets = make_buckets(cfg.resolution, cfg.bucket_step)
    images = []
    first_of: dict[str, str] = {}
    duplicates: dict[str, list[str]] = {}
    for ex in result.examples:
        h, w = ex.size
        bucket = nearest_bucket((h, w), buckets) if cfg.buckets else (cfg.resolution, cfg.resolution)
        caption = final_caption(ex.caption, ex.trigger, cfg, None)
        tokens = count(caption)
        images.append({"name": ex.name, "dataset": ex.dataset, "width": w, "height": h,
                       "bucket": bucket_label(bucket), "caption": caption, "tokens": tokens})
        if tokens > limit:
            problems.append(Problem(ex.name, "caption too long", f"{tokens} tokens, limit {limit}: the last "
                                    f"{tokens - limit} are cut", "warning"))
        if ex.digest in first_of:
            duplicates.setdefault(first_of[ex.digest], [first_of[ex.digest]]).append(ex.name)
            problems.append(Problem(ex.name, "duplicate", f"same bytes as {first_of[ex.digest]}", "warning"))
        else:
            first_of[ex.digest] = ex.name
    return {
        "datasets": [{"path": d.path, "images": sum(1 for e in result.examples if e.dataset == d.index),
                      "repeats": d.repeats, "weight": d.weight} for d in result.datasets],
        "usable": len(result.examples),
        "resolutions": dict(Counter(f"{i['width']}x{i['height']}" for i in images).most_common()),
        "aspect_ratios": dict(Counter(f"{i['width'] / i['height']:.2f}" for i in images).most_common()),
        "buckets": {"enabled": cfg.buckets, "resolution": cfg.resolution, "step": cfg.bucket_step,
                    "counts": dict(Counter(i["bucket"] for i in images).most_common())},
        "captions": {"limit": limit, "how": how, "too_long": sum(p.kind == "caption too long" for p in problems),
                     "missing": sum(p.kind == "no caption" for p in problems),
                     "empty": sum(p.kind == "empty caption" for p in problems)},
        "duplicates": list(duplicates.values()),
        "images": images,
        "problems": [asdict(p) for p in problems],
        "skipped": sum(p.severity == "skipped" for p in problems),
        "warnings": sum(p.severity == "warning" for p in problems),
        "trainable": bool(result.examples),
    }


def _hist(counts: dict, limit: int = 8) -> str:
    items = list(counts.items())
    text = ", ".join(f"{k}: {v}" for k, v in items[:limit])
    return text + (f", … ({len(items) - limit} more)" if len(items) > limit else "") if items else "-"


def format_report(report: dict) -> str:
    lines = []
    for d in report["datasets"]:
        extra = f", repeats {d['repeats']}" + (f", weight {d['weight']}" if d["weight"] is not None else "")
        lines.append(f"dataset {d['path']}: {d['images']} usable images{extra}")
    lines.append(f"usable images: {report['usable']}")
    lines.append(f"resolutions (width x height): {_hist(report['resolutions'])}")
    lines.append(f"aspect ratios (width / height): {_hist(report['aspect_ratios'])}")
    b = report["buckets"]
    state = "on" if b["enabled"] else "off, every image is cropped square"
    lines.append(f"buckets (data.buckets {state}; resolution {b['resolution']}, step {b['step']}):")
    by_bucket: dict[str, list[str]] = {}
    for img in report["images"]:
        by_bucket.setdefault(img["bucket"], []).append(img["name"])
    for label, names in sorted(by_bucket.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(names[:6]) + (f", … ({len(names) - 6} more)" if len(names) > 6 else "")
        lines.append(f"  {label}: {len(names)} ({shown})")
    c = report["captions"]
    lines.append(f"captions ({c['how']}): {c['missing']} missing, {c['empty']} empty, {c['too_long']} too long")
    for group in report["duplicates"]:
        lines.append(f"duplicates: {', '.join(group)}")
    if report["problems"]:
        lines.append(f"problems ({report['skipped']} skipped, {report['warnings']} warnings):")
        for p in report["problems"]:
            lines.append(f"  {p['severity']:<8} {p['name']}: {p['kind']}: {p['detail']}")
    lines.append("ok: data is trainable" if report["trainable"] else "error: no usable images")
    return "\n".join(lines)
