"""The ``difftune`` command line: one table of commands, each a small function."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from difftune.cli.adapters import COMMANDS as ADAPTER_COMMANDS
from difftune.errors import DifftuneError


def _load(args):
    from difftune.run_config import load_config

    return load_config(args.config, overrides=args.set)


def cmd_train(args) -> int:
    """Train; a run stopped by SIGINT/SIGTERM exits with 128 + the signal number (130, 143) after its checkpoint."""
    if args.force_resume:
        args.set.append("train.resume_force=true")
    if args.overwrite or args.new_folder:
        args.set.append(f"output.existing={'overwrite' if args.overwrite else 'new'}")
    config = _load(args)
    from difftune.training.loop import train

    result = train(config)
    if result.interrupted:
        import shlex

        sets = [s for s in args.set if not s.replace(" ", "").startswith(("train.resume=", "train.resume_force="))]
        source = args.config
        if config.output.existing == "new" and result.output_dir != Path(config.output.dir).expanduser():
            # the run wrote to a new numbered folder: its config.toml names that folder
            source, sets = str(result.output_dir / "config.toml"), []
        command = ["difftune", "train", source, *(a for s in sets for a in ("--set", s)),
                   "--set", "train.resume=latest", *(["--force-resume"] if args.force_resume else [])]
        print(f"to resume: {shlex.join(command)}")
        return 128 + result.interrupted
    return 0


def cmd_validate(args) -> int:
    from difftune.config.active import options_block

    config = _load(args)
    print(f"{args.config}: ok (model {config.model.path}, method {config.method.type}, data {config.data.path})")
    print(options_block(config))
    return 0


def cmd_init(args) -> int:
    from difftune.config.reference import starter_config
    from difftune.run_config import registered_choices

    sys.stdout.write(starter_config(registered_choices()))
    return 0


def cmd_demo(args) -> int:
    from difftune.demo import run_demo

    run_demo(**({"steps": args.steps} if args.steps is not None else {}), workdir=args.dir)
    return 0


def cmd_env(args) -> int:
    """Versions for a bug report; works even when the installed packages are known not to work together."""
    from difftune.compat import environment_report

    sys.stdout.write(environment_report())
    return 0


def cmd_reference(args) -> int:
    from difftune.config.reference import markdown_reference
    from difftune.run_config import registered_choices

    sys.stdout.write(markdown_reference(registered_choices()))
    return 0


def cmd_data(args) -> int:
    return args.data_func(args)


def cmd_data_check(args) -> int:
    import json
    from pathlib import Path

    from difftune.data.report import check_dataset, folder_config, format_report
    from difftune.run_config import load_config

    tokenizers: list = []
    if args.target.endswith(".toml"):
        config = load_config(args.target, overrides=args.set)
        from difftune.models import resolve_family

        try:
            family, source = resolve_family(config.model)
            tokenizers = family.load_tokenizers(source)
        except DifftuneError as exc:
            print(f"note: could not load the model's tokenizer ({exc}); estimating caption lengths", file=sys.stderr)
    else:
        if not Path(args.target).expanduser().exists():
            raise DifftuneError(f"{args.target}: no such folder or config")
        config = folder_config(args.target, args.set)
    report = check_dataset(config.data, tokenizers)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    if not report["trainable"]:
        return 1
    return 1 if args.strict and (report["skipped"] or report["warnings"]) else 0


def cmd_data_prepare(args) -> int:
    from difftune.data.prepare import prepare_folder

    result = prepare_folder(args.src, args.dst, size=args.size, crop=args.crop, fmt=args.format,
                            caption=args.caption, min_images=args.min_images, background=args.background,
                            overwrite=args.overwrite)
    for p in result.problems:
        if p.severity != "note":
            print(f"{p.severity}: {p.line}")
    for w in result.warnings:
        print(f"warning: {w}")
    print(f"wrote {len(result.written)} images and metadata.jsonl to {args.dst}")
    return 0 if result.written else 1


def cmd_cache(args) -> int:
    from difftune.training.setup import fill_caches

    data = fill_caches(_load(args))
    print(f"cache ready for {len(data.dataset)} images")
    return 0


def cmd_ui(args) -> int:
    from difftune.ui.server import serve

    return serve(args.root, host=args.host, port=args.port, token=args.token)


def _add_ui_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860; 0 picks a free one)")
    p.add_argument("--root", default=".", help="folder whose datasets, configs and runs the app may use (default: .)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1); any other address requires an access token")
    p.add_argument("--token", default=None,
                   help="access token (default: generated and printed when --host is not a loopback address)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = sub.add_parser("check", help="pre-flight report on a dataset folder or a run config's data",
                           description="Usable images, sizes, buckets, caption lengths, duplicates and one line "
                                       "per problem file.")
    check.add_argument("target", metavar="PATH_OR_CONFIG", help="image folder or run config (.toml)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--strict", action="store_true", help="exit non-zero if any file has a problem")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set data.resolution=1024")
    check.set_defaults(data_func=cmd_data_check)
    prep = sub.add_parser("prepare", help="write a cleaned, resized copy of an image folder with metadata.jsonl")
    prep.add_argument("src", help="source image folder")
    prep.add_argument("dst", help="output folder")
    prep.add_argument("--size", type=int, default=512, help="target size in pixels (default 512)")
    prep.add_argument("--crop", choices=("square", "keep"), default="square",
                      help="centre-crop square, or keep the aspect ratio (shorter side = size)")
    prep.add_argument("--format", choices=("png", "jpg"), default="png", help="output format")
    prep.add_argument("--caption", default=None, help="caption for images without one, e.g. \"a photo of sks dog\"")
    prep.add_argument("--min-images", type=int, default=5, help="warn below this many images (default 5)")
    prep.add_argument("--background", default="white", help="colour under transparent pixels")
    prep.add_argument("--overwrite", action="store_true",
                      help="write into an output folder that already holds files (replacing same-named ones)")
    prep.set_defaults(data_func=cmd_data_prepare)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.learning_rate=5e-5 (repeatable); "
                        "--set KEY=none unsets a key that may be left unset, e.g. train.snr_gamma")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--force-resume", action="store_true",
                   help="resume even if the model, method or data changed since the checkpoint "
                        "(train.resume_force = true)")
    folder = p.add_mutually_exclusive_group()
    folder.add_argument("--overwrite", action="store_true",
                        help="if output.dir holds another run's results, delete them first (output.existing = overwrite)")
    folder.add_argument("--new-folder", action="store_true",
                        help="if output.dir holds another run's results, write to output.dir-2, -3, ... "
                             "(output.existing = new)")


COMMANDS: dict[str, tuple[Callable, str, Callable[[argparse.ArgumentParser], None] | None]] = {
    "train": (cmd_train, "train from a config file", _add_train_args),
    "validate": (cmd_validate, "check a config and its paths without loading weights", _add_config_args),
    "init": (cmd_init, "print a commented starter config", None),
    "demo": (cmd_demo, "teach the embedded base a new shape with a LoRA; before/after grid and scores (no download, CPU)",
             lambda p: (p.add_argument("--steps", type=int, default=None,
                                         help="LoRA training steps (default: the demo's own, 1600)"),
                        p.add_argument("--dir", default=None, help="work folder (default: a cache folder)"))),
    "data": (cmd_data, "check or prepare a dataset (difftune data check|prepare ...)", _add_data_args),
    "cache": (cmd_cache, "fill the latent/text caches of a config ahead of training", _add_config_args),
    "env": (cmd_env, "print difftune, Python, torch (and its device) and every dependency's version for a bug report",
            None),
    "ui": (cmd_ui, "a local web app to check data, configure, queue, watch and compare runs", _add_ui_args),
    "reference": (cmd_reference, "print the config reference (Markdown) generated from the schema", None),
}
COMMANDS.update(ADAPTER_COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    from difftune.version import __version__

    parser = argparse.ArgumentParser(prog="difftune", description="Fine-tune text-to-image diffusion models.")
    parser.add_argument("--version", action="version", version=f"difftune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, help_text, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if add_args:
            add_args(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DifftuneError as exc:
        print(f"difftune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a path that cannot be read or written (permission, read-only, not a folder, full)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"difftune: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("difftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
