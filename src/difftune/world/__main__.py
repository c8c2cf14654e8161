"""``python -m difftune.world``: rebuild the closed world's data, judge and base (docs/world.md).

    python -m difftune.world data work/shapes/data --n 40000      # pretraining images + captions
    python -m difftune.world vae work/shapes/vae                  # the autoencoder
    python -m difftune.world init work/shapes/init --vae work/shapes/vae
    difftune train configs/shapes-pretrain.toml                   # UNet + text encoder, by difftune
    python -m difftune.world ship work/shapes/run/pipeline        # fp16 copy into the package
    python -m difftune.world judge src/difftune/world/judge.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time


def _data(args) -> None:
    from difftune.world.data import write_pretraining_set

    started = time.perf_counter()
    write_pretraining_set(args.out, args.n, seed=args.seed, size=args.size)
    print(f"wrote {args.n} images to {args.out} in {time.perf_counter() - started:.0f} s")


def _vae(args) -> None:
    from difftune.world.autoencoder import ColourLossError, train_autoencoder

    try:
        train_autoencoder(args.out, steps=args.steps, seed=args.seed)
    except ColourLossError as error:
        raise SystemExit(f"error: {error}") from None


def _init(args) -> None:
    from difftune.world.base import build_init, write_clip_tokenizer

    tokenizer = None
    if args.bpe:
        tokenizer = write_clip_tokenizer(args.bpe, f"{args.out}.tokenizer")
    build_init(args.out, args.vae, tokenizer=tokenizer, seed=args.seed)
    print(f"wrote the random-initialised base to {args.out}")


def _ship(args) -> None:
    from difftune.bases import BASES_DIR
    from difftune.world.base import ship

    dest = args.dest or BASES_DIR / "shapes"
    sums = ship(args.pipeline, dest)
    for name, digest in sums.items():
        print(f"{digest}  {name}")
    print(f"shipped {args.pipeline} to {dest}")


def _judge(args) -> None:
    from difftune.world.judge_train import train_judge

    train_judge(args.out, steps=args.steps, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m difftune.world", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="write the pretraining images and metadata.jsonl")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=40000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.set_defaults(func=_data)
    p = sub.add_parser("vae", help="train the autoencoder (pretraining scenes and generic images)")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_vae)
    p = sub.add_parser("init", help="write the random-initialised base that difftune pretrains")
    p.add_argument("out")
    p.add_argument("--vae", required=True, help="the autoencoder folder written by `vae`")
    p.add_argument("--bpe", default=None,
                   help="rebuild the tokenizer from CLIP's bpe_simple_vocab_16e6.txt.gz (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_init)
    p = sub.add_parser("ship", help="copy a pretrained pipeline into the package (fp16) and print sha256s")
    p.add_argument("pipeline")
    p.add_argument("--dest", default=None, help="default: the package's bases/shapes")
    p.set_defaults(func=_ship)
    p = sub.add_parser("judge", help="train the judge and print its accuracy on fresh renders")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_judge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
