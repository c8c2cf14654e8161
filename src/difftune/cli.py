"""The ``difftune`` command line: one table of commands, each a small function."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from difftune.adapters.commands import COMMANDS as ADAPTER_COMMANDS
from difftune.errors import DifftuneError


def _load(args):
    from difftune.config import load_config

    return load_config(args.config, overrides=args.set)


def cmd_train(args) -> int:
    config = _load(args)
    from difftune.training.loop import train

    train(config)
    return 0


def cmd_validate(args) -> int:
    config = _load(args)
    print(f"{args.config}: ok (model {config.model.path}, method {config.method.type}, data {config.data.path})")
    return 0


def cmd_init(args) -> int:
    from difftune.config.reference import starter_config

    sys.stdout.write(starter_config())
    return 0


def cmd_demo(args) -> int:
    from difftune.demo import run_demo

    run_demo(steps=args.steps, workdir=args.dir)
    return 0


def cmd_reference(args) -> int:
    from difftune.config.reference import markdown_reference

    sys.stdout.write(markdown_reference())
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.learning_rate=5e-5 (repeatable)")


COMMANDS: dict[str, tuple[Callable, str, Callable[[argparse.ArgumentParser], None] | None]] = {
    "train": (cmd_train, "train from a config file", _add_config_args),
    "validate": (cmd_validate, "check a config and its paths without loading weights", _add_config_args),
    "init": (cmd_init, "print a commented starter config", None),
    "demo": (cmd_demo, "train a tiny model on a generated dataset (no download, CPU)",
             lambda p: (p.add_argument("--steps", type=int, default=300),
                        p.add_argument("--dir", default=None, help="work folder (default: a cache folder)"))),
    "reference": (cmd_reference, "print the config reference (Markdown) generated from the schema", None),
}
COMMANDS.update(ADAPTER_COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    from difftune import __version__

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
    except KeyboardInterrupt:
        print("difftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
