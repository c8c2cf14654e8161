"""The adapter commands of the ``difftune`` CLI: argument definitions and thin command functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from difftune.errors import DifftuneError


def _overwrite_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} if it already exists")


def _pickle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read pickle files (.bin/.ckpt/.pt) with torch.load(weights_only=True); only if trusted")


# --- generate ---------------------------------------------------------------------------------


def add_generate_args(p: argparse.ArgumentParser) -> None:
    from difftune.inference.schedulers import SCHEDULERS

    p.add_argument("--model", required=True, help="base model: diffusers folder, .safetensors file or Hub id")
    p.add_argument("--lora", action="append", default=[], metavar="FILE_OR_DIR[:WEIGHT]",
                   help="adapter to apply with its weight (default 1.0); repeatable")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="textual-inversion embedding and the token to use in prompts; repeatable")
    p.add_argument("--prompt", action="append", default=[], required=True, help="prompt; repeatable")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default="dpm++",
                   help="sampler (default dpm++: DPM-Solver multistep)")
    p.add_argument("--family", default="auto", help="model family (default: detected)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    p.add_argument("--out", required=True, help="folder for the images and grid.png")
    _overwrite_arg(p, "images, grid.png and generate.json of the same names in --out")
    _pickle_arg(p)


def cmd_generate(args) -> int:
    from difftune.adapters.safe_load import parse_token_suffix, parse_weighted
    from difftune.inference.generate import GenerateSettings, generate

    generate(GenerateSettings(
        model=args.model, prompts=args.prompt, out=Path(args.out),
        loras=[parse_weighted(s) for s in args.lora], embeddings=[parse_token_suffix(s) for s in args.embedding],
        negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance, seed=args.seed,
        images_per_prompt=args.num_images, width=args.width, height=args.height, scheduler=args.scheduler,
        family=args.family, dtype=args.dtype, allow_pickle=args.allow_pickle, overwrite=args.overwrite,
    ))
    return 0


# --- merge ------------------------------------------------------------------------------------


def add_merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT]", help="adapters and their weights (default 1.0)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file (or folder with --fuse)")
    p.add_argument("--rank", type=int, default=None, help="reduce to this rank by SVD (reports the error)")
    p.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers", help="output format")
    p.add_argument("--fuse", action="store_true", help="bake the adapters into --model and save a diffusers folder")
    p.add_argument("--model", default=None, help="base model for --fuse")
    p.add_argument("--family", default=None,
                   help="model family whose kohya names to write with --format kohya (default: recorded in the inputs)")
    _overwrite_arg(p, "the -o file (never an input; --fuse never writes into an existing folder)")
    _pickle_arg(p)


def cmd_merge(args) -> int:
    from difftune.adapters.convert import check_output, read_adapter, write_adapter
    from difftune.adapters.merge import concat_merge, format_report, report_metadata, svd_reduce
    from difftune.adapters.safe_load import parse_weighted

    specs = [parse_weighted(s) for s in args.adapters]
    if args.fuse:
        return _fuse(args, specs)
    check_output(args.out, tuple(p for p, _ in specs), args.overwrite)  # before any work
    merged = concat_merge([(read_adapter(p, allow_pickle=args.allow_pickle), w) for p, w in specs])
    if args.rank is not None:
        merged, report = svd_reduce(merged, args.rank)
        print(format_report(report))
        merged.metadata.update(report_metadata(report))
    merged.metadata["difftune.merge"] = json.dumps([[str(p), w] for p, w in specs])
    out = write_adapter(merged, args.out, args.format, _family_arg(args.family), inputs=tuple(p for p, _ in specs),
                        overwrite=args.overwrite)
    ranks = sorted({m.rank for m in merged.modules.values()})
    print(f"wrote {out}: {len(merged.modules)} modules, rank {'/'.join(map(str, ranks))}")
    return 0


def _fuse(args, specs) -> int:
    import torch

    from difftune.adapters.convert import read_adapter
    from difftune.adapters.merge import concat_merge, fuse_into
    from difftune.inference.apply import check_base_model, check_coverage, pipeline_target
    from difftune.models import load_pipeline

    if not args.model:
        raise DifftuneError("--fuse needs --model PATH (the base model to bake the adapters into)")
    if args.overwrite:
        raise DifftuneError("--overwrite does not apply to --fuse: it never writes into an existing folder; "
                            "remove the folder first or choose another -o")
    if Path(args.out).exists():
        raise DifftuneError(f"-o {args.out}: already exists; --fuse writes a new diffusers folder (never over "
                            "the base model or another folder)")
    pipe, family, components = load_pipeline(args.model, dtype=torch.float32)
    target = pipeline_target(pipe)
    adapters = []
    for path, weight in specs:
        adapter = read_adapter(path, allow_pickle=args.allow_pickle, **target)
        adapter = check_coverage(adapter, target["module_names"], path)
        check_base_model(adapter, family, components, path)
        adapters.append((adapter, weight))
    n = fuse_into(pipe, concat_merge(adapters))
    out = Path(args.out)
    pipe.scheduler = components.noise_scheduler
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"fused {n} modules into {args.model}; saved the diffusers folder {out} "
          "(single-file LDM checkpoints are not written)")
    return 0


# --- convert ----------------------------------------------------------------------------------


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="adapter file or folder")
    p.add_argument("--to", choices=["kohya", "diffusers"], required=True, help="output format")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file")
    p.add_argument("--to-lora", action="store_true", help="reduce DoRA/LoHa/LoKr (or any LoRA) to a plain LoRA by SVD")
    p.add_argument("--rank", type=int, default=None, help="rank of the plain LoRA for --to-lora")
    p.add_argument("--model", default=None,
                   help="base model: resolves names exactly; needed by --to-lora for peft DoRA/LoHa/LoKr files")
    p.add_argument("--family", default=None,
                   help="model family whose kohya names to write (sd3, flux, ...); default: recorded in the file, "
                        "else inferred from the module names or --model")
    _overwrite_arg(p, "the -o file (never the input)")
    _pickle_arg(p)


def cmd_convert(args) -> int:
    from difftune.adapters.convert import check_output, convert, write_adapter

    check_output(args.out, (args.input,), args.overwrite)  # before any work
    if args.to_lora:
        if args.rank is None:
            raise DifftuneError("--to-lora needs --rank R")
        from difftune.adapters.merge import format_report
        from difftune.adapters.reduce import reduce_file

        adapter, report = reduce_file(args.input, args.rank, model=args.model, allow_pickle=args.allow_pickle)
        print(format_report(report))
        out = write_adapter(adapter, args.out, args.to, inputs=(args.input,), overwrite=args.overwrite)
    else:
        target = {"family": _family_arg(args.family)}
        if args.model:
            import torch

            from difftune.inference.apply import pipeline_target
            from difftune.models import load_pipeline

            pipe, family, _ = load_pipeline(args.model, dtype=torch.float32)
            target.update(pipeline_target(pipe))
            target["family"] = target["family"] or family.name
        out = convert(args.input, args.to, args.out, allow_pickle=args.allow_pickle, overwrite=args.overwrite,
                      **target)
    print(f"wrote {out} ({args.to} format)")
    if args.to == "kohya":
        from difftune.adapters.kohya import diffusers_note
        from difftune.adapters.safe_load import load_tensors

        note = diffusers_note(*load_tensors(out))
        if note:
            print(f"note: {note}; `difftune convert --to diffusers` keeps every module for diffusers")
    return 0


def _family_arg(name: str | None) -> str | None:
    from difftune.models import FAMILIES

    if name is not None and name not in FAMILIES:
        raise DifftuneError(f"--family {name!r}: unknown model family; choose one of {', '.join(FAMILIES.names())}")
    return name


# --- inspect ----------------------------------------------------------------------------------


def add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="weight file (or a folder holding one adapter)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _pickle_arg(p)


def cmd_inspect(args) -> int:
    from difftune.adapters.inspect import format_info, inspect_file

    info = inspect_file(args.file, allow_pickle=args.allow_pickle)
    sys.stdout.write((json.dumps(info, indent=2, default=str) if args.json else format_info(info)) + "\n")
    return 1 if info["non_finite"] else 0  # broken weights: flagged, and a script sees it in the exit status


# --- push -------------------------------------------------------------------------------------


def add_push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run folder (holds the adapter and README.md)")
    p.add_argument("--repo", required=True, metavar="OWNER/NAME", help="Hub model repository (created if missing)")
    p.add_argument("--base-model", default=None, metavar="OWNER/NAME",
                   help="Hub id of the base model, when the card names a local path")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded, upload nothing")


def cmd_push(args) -> int:
    from difftune.publish.push import push

    push(args.run_dir, args.repo, base_model=args.base_model, private=args.private, dry_run=args.dry_run)
    return 0


COMMANDS = {
    "generate": (cmd_generate, "generate images with a base model plus weighted adapters and embeddings",
                 add_generate_args),
    "merge": (cmd_merge, "merge adapters into one (exact or SVD-reduced), or fuse them into the base model",
              add_merge_args),
    "convert": (cmd_convert, "convert an adapter between diffusers and kohya formats, or reduce it to LoRA",
                add_convert_args),
    "inspect": (cmd_inspect, "show a weight file's format, metadata, module coverage and weight norms",
                add_inspect_args),
    "push": (cmd_push, "upload a run's adapter, card and samples to the Hugging Face Hub", add_push_args),
}
