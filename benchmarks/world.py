"""The closed world's acceptance figures: the judge's accuracy and the embedded base's prompt adherence.

    python benchmarks/world.py                 # judge on fresh renders + base on unseen combinations
    python benchmarks/world.py --n 64 --steps 20 --guidance 5

Prints, per attribute, the judge's accuracy on fresh renders (64 and 128 px; targets >= 98 %),
then the base's adherence on prompts whose shape/colour pair was held out of pretraining
(targets: colour >= 90 %, shape >= 80 % of 64 images at 20 sampling steps), and the same on
pairs it did see, for comparison. The base is loaded with diffusers alone, as a user would.
"""

from __future__ import annotations

import argparse
import random
import time


def judge_figures(judge, n: int) -> None:
    from difftune.world.judge_train import fresh_accuracy

    for size in (64, 128):
        started = time.perf_counter()
        acc = fresh_accuracy(judge, n=n, seed=size, size=size)
        figures = ", ".join(f"{k} {v:.1%}" for k, v in acc.items())
        print(f"judge on {n} fresh {size} px renders: {figures} ({time.perf_counter() - started:.0f} s)")


def seen_prompts(n: int, seed: int = 0):
    from difftune.world import grammar as g
    from difftune.world.evaluate import prompt_for
    from difftune.world.scene import PRETRAINING

    rng = random.Random(f"seen/{seed}")
    out = []
    for _ in range(n):
        scene = PRETRAINING.sample(rng).with_(rotation=0.0, dx=0.0, dy=0.0, scale=1.0)
        mention = [k for k in ("size", "background", "position") if rng.random() < 0.5]
        out.append(prompt_for(scene, mention=("colour", *mention)))
    assert all((p.expected["shape"], p.expected["colour"]) not in g.held_out_pairs() for p in out)
    return out


def adherence(pipe, judge, prompts, steps: int, guidance: float, label: str) -> dict[str, float]:
    from difftune.world.evaluate import sample, score

    started = time.perf_counter()
    images = sample(pipe, [p.text for p in prompts], list(range(len(prompts))), steps=steps, guidance=guidance)
    _, acc = score(judge, images, prompts)
    n = len(prompts)
    parts = []
    for name, value in acc.items():
        stated = sum(name in p.expected for p in prompts)
        parts.append(f"{name} {value:.0%} ({round(value * stated)}/{stated})")
    print(f"base on {n} {label} prompts ({steps} steps, guidance {guidance:g}): {', '.join(parts)} "
          f"({time.perf_counter() - started:.0f} s)")
    return acc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="prompts per adherence figure (default 64)")
    parser.add_argument("--renders", type=int, default=2000, help="fresh renders per judge figure (default 2000)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None, help="default: difftune.world.evaluate.GUIDANCE")
    parser.add_argument("--model", default=None, help="a diffusers folder (default: the embedded difftune:shapes)")
    parser.add_argument("--judge-only", action="store_true")
    args = parser.parse_args()

    from difftune.world.evaluate import GUIDANCE, unseen_combination_prompts
    from difftune.world.judge import Judge

    judge = Judge.load()
    judge_figures(judge, args.renders)
    if args.judge_only:
        return 0
    from difftune.bases import builtin_path
    from difftune.world.evaluate import load_pipeline

    folder = args.model or builtin_path("shapes")
    pipe = load_pipeline(folder)
    guidance = args.guidance if args.guidance is not None else GUIDANCE
    unseen = adherence(pipe, judge, unseen_combination_prompts(args.n), args.steps, guidance,
                       "unseen shape/colour combination")
    adherence(pipe, judge, seen_prompts(args.n), args.steps, guidance, "seen combination")
    ok = unseen.get("colour", 0) >= 0.9 and unseen.get("shape", 0) >= 0.8
    print(f"acceptance (unseen: colour >= 90 %, shape >= 80 %): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
