"""Does a LoRA trained on a quantised base still learn? The demo's task, judged, per base precision.

    PYTHONPATH=src python benchmarks/quantized_demo.py [--precision int8 --precision fp8] [--work DIR]

Runs ``difftune demo``'s task (a rank-16 LoRA teaching ``difftune:shapes`` the star as "zorb", 800
steps) once as shipped and once per ``--precision`` with ``model.quantize`` set — the UNet's linear
layers quantised during training, everything else equal — and judges each adapter the way the demo
does: 16 images (8 prompts x 2 seeds) drawn with the adapter on the unquantised base, as a user would
load it. Prints one row per run (issue 19: "the concept score stays within a few points of the bf16
run"). Needs the quantisation extra (``pip install "difftune[quantize]"``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from difftune.demo import run_demo


def main(argv=None) -> list[tuple[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", action="append", choices=("int8", "fp8", "int4", "nf4"),
                        help="quantised bases to compare with the shipped one (default int8)")
    parser.add_argument("--steps", type=int, default=None, help="LoRA steps (default: the demo's)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="difftune-qdemo-"))
    steps = {"steps": args.steps} if args.steps else {}
    rows = []
    for precision in ["bf16", *(args.precision or ["int8"])]:
        settings = {} if precision == "bf16" else {"model": {"quantize": precision}}
        started = time.perf_counter()
        result = run_demo(workdir=work / precision, log=lambda _message: None, settings=settings, **steps)
        rows.append((precision, result))
        print(f"{precision}: trained in {result.train_seconds:.0f} s ({time.perf_counter() - started:.0f} s with "
              "judging)", flush=True)
    print(f"\n| base during training | shows the star (of {rows[0][1].images}) | other attributes right | "
          "position as asked | training time |\n|---|---|---|---|---|")
    for precision, r in rows:
        print(f"| {precision} | {r.concept_before} → {r.concept_after} | {r.others_before:.0%} → {r.others_after:.0%} "
              f"| {r.position_before}/{r.positions} → {r.position_after}/{r.positions} | {r.train_seconds:.0f} s |")
    return rows


if __name__ == "__main__":
    main()
