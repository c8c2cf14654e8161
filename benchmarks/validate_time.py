"""How long ``difftune validate`` takes on a good config, and whether it imports torch.

    python benchmarks/validate_time.py              # a tiny model and dataset in a temporary folder
    python benchmarks/validate_time.py run.toml     # your own config

Each run is a fresh ``python -m difftune validate`` process (interpreter start-up included); the
target is under 0.5 s of wall time with no torch, diffusers or transformers import.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = (
    "import sys\n"
    "from difftune.cli import main\n"
    "code = main(['validate', sys.argv[1]])\n"
    "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules]\n"
    "print('heavy=' + ','.join(heavy), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def tiny_config(folder: Path) -> Path:
    from difftune.tiny import build_tiny_sd, make_tiny_dataset

    model = build_tiny_sd(folder / "model")
    data = make_tiny_dataset(folder / "data", n=4, size=64)
    config = folder / "run.toml"
    config.write_text(f'[model]\npath = "{model}"\n[method]\ntype = "lora"\n[data]\npath = "{data}"\n'
                      f'[output]\ndir = "{folder / "out"}"\n')
    return config


def measure(config: Path, repeats: int) -> tuple[list[float], list[float], str]:
    walls, cpus, heavy = [], [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True)
        walls.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"validate failed: {done.stderr.strip()}")
        heavy = next(line for line in done.stderr.splitlines() if line.startswith("heavy="))[len("heavy="):]
    # CPU time of the children (user + system), averaged over the runs.
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpus.append((usage.ru_utime + usage.ru_stime) / repeats)
    return walls, cpus, heavy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="config to validate (default: a tiny one)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(args.config) if args.config else tiny_config(Path(tmp))
        walls, cpus, heavy = measure(config, args.repeats)
    print(f"difftune validate: median {statistics.median(walls):.3f} s wall, best {min(walls):.3f} s, "
          f"{cpus[0]:.3f} s CPU per run ({args.repeats} runs); heavy modules imported: {heavy or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
