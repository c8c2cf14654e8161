"""Acceptance run of issue 18: a full fine-tune of the embedded base with FSDP on 2 processes ends with the same
judge scores as 1 process at the same global batch.

Run: ``PYTHONPATH=src python benchmarks/fsdp_judge.py [--steps 200] [--precision no|bf16] [--work DIR]``.
Prints figures; it is not a test. It trains ``difftune:shapes`` in full on the demo's task (the eight
"zorb" stars beside known shapes in equal share: ``difftune.demo``'s data writers and config) twice, one
launch after the other, each process with 1 OpenMP thread: once as 1 process with batch 4, once as
``torchrun --nproc_per_node 2`` (gloo, 127.0.0.1) with ``train.distributed = "fsdp"`` and batch 2 per
process. Then it draws the demo's grid (its prompts and seeds) from both exported pipelines, lets the
judge score them, and prints both scores, whether the verdicts agree image by image, and the largest
difference between the two runs' per-step losses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from difftune.config.loader import dump_toml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_config(data: Path, known: Path, out: Path, steps: int, precision: str, processes: int) -> dict:
    """The demo's run made a full fine-tune of the UNet (no sampling during training: FSDP refuses it)."""
    from difftune.demo import demo_config

    cfg = demo_config(data, known, out, steps)
    cfg["method"] = {"type": "full"}
    cfg.pop("validation")
    cfg["logging"] = {"report_to": "none"}
    cfg["train"].update({"learning_rate": 1e-4, "batch_size": 4 // processes, "mixed_precision": precision,
                         "log_every": 1})
    if processes > 1:
        cfg["train"]["distributed"] = "fsdp"
    return cfg


def launch(cfg: dict, path: Path, processes: int) -> float:
    """Train ``cfg`` (written to ``path``) in ``processes`` processes; the wall time in seconds."""
    path.write_text(dump_toml(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "difftune", "train", str(path)]
    if processes > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
                    "127.0.0.1", "--master_port", str(free_port())]
    print("$ OMP_NUM_THREADS=1 python " + " ".join(cmd[1:]), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"training failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    first = next(line for line in proc.stdout.splitlines() if line.startswith("processes:"))
    print("  " + first, flush=True)
    return time.perf_counter() - started


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def judged(out: Path, judge) -> tuple[dict, list[dict[str, str]]]:
    """The judge's scores of the grid drawn by the run's exported pipeline, and its verdicts."""
    from difftune.demo import CONCEPT, NOT_SCORED, grid_prompts, judged_grid
    from difftune.world.evaluate import load_pipeline, other_attributes_right

    _, verdicts = judged_grid(load_pipeline(out / "pipeline"), judge)
    prompts = grid_prompts()
    return {"concept": sum(v["shape"] == CONCEPT for v in verdicts), "images": len(verdicts),
            "others": other_attributes_right(verdicts, prompts, skip=NOT_SCORED)}, verdicts


def prepare(work: Path) -> tuple[Path, Path]:
    """The demo's training images: the stars and the known shapes."""
    from difftune.demo import KNOWN_SHAPES, write_concept_data
    from difftune.world.data import write_pretraining_set

    data, known = work / "zorb-images", work / "known-shapes"
    if not (data / "metadata.jsonl").is_file():
        write_concept_data(data)
    if not (known / "metadata.jsonl").is_file():
        write_pretraining_set(known, KNOWN_SHAPES)
    return data, known


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--work", type=Path, help="folder for the data and runs (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="fsdp-judge-"))
    data, known = prepare(work)
    outs, seconds = {}, {}
    for processes in (1, 2):
        outs[processes] = work / f"run-{processes}"
        shutil.rmtree(outs[processes], ignore_errors=True)
        cfg = run_config(data, known, outs[processes], args.steps, args.precision, processes)
        seconds[processes] = launch(cfg, work / f"run-{processes}.toml", processes)
    one, two = losses(outs[1]), losses(outs[2])
    assert one.keys() == two.keys() and len(one) == args.steps, "both runs log every step"
    worst = max(abs(one[s] - two[s]) for s in one)
    from difftune.world.judge import Judge

    judge = Judge.load()
    (s1, v1), (s2, v2) = judged(outs[1], judge), judged(outs[2], judge)
    print(f"full fine-tune of difftune:shapes, {args.steps} steps, global batch 4, mixed precision {args.precision}")
    for name, n, s in (("1 process  (batch 4)     ", 1, s1), ("2 processes (fsdp, 2 each)", 2, s2)):
        print(f"  {name}: star {s['concept']}/{s['images']}, other attributes {s['others']:.1%}, "
              f"final loss {(one if n == 1 else two)[args.steps]:.6f}, trained in {seconds[n]:.0f} s")
    print(f"  judge verdicts identical image by image: {v1 == v2} "
          f"({sum(a == b for a, b in zip(v1, v2, strict=True))}/{len(v1)})")
    print(f"  max per-step loss difference over {len(one)} steps: {worst:.2e}")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
