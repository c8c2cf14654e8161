"""Steps per second with and without latent + text caching, on a small model built from config.

Run: ``PYTHONPATH=src python benchmarks/caching.py [--steps 40] [--resolution 128]``. Prints figures;
it is not a test. The model is a tiny SD-architecture one (random weights, nothing downloaded),
widened a little so the VAE and text encoder cost something, as they do in real models.

On the benchmark model (SD 1.5 architecture, half-width UNet, full-size VAE and text encoder) the
same comparison is ``benchmarks/compare.py --variant "cached:data.cache_latents=true,data.cache_text=true"
--variant "uncached:data.cache_latents=false,data.cache_text=false"``; figures in docs/performance.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()

    from difftune.run_config import load_config
    from difftune.tiny import TinySize, build_tiny_sd, make_tiny_dataset
    from difftune.training.loop import train

    work = Path(tempfile.mkdtemp(prefix="difftune-bench-"))
    size = TinySize(vae_channels=(64, 64, 64), text_layers=4, sample_size=args.resolution)
    model = build_tiny_sd(work / "model", size=size)
    data = make_tiny_dataset(work / "data", n=args.images, size=args.resolution * 2)

    def run(name: str, **data_options) -> float:
        config = load_config(data={
            "model": {"path": str(model)},
            "method": {"type": "lora", "rank": 4},
            "data": {"path": str(data), "resolution": args.resolution, "random_flip": True,
                     "cache_dir": str(work / "cache"), **data_options},
            "train": {"max_steps": args.steps, "learning_rate": 1e-4, "checkpoint_every": 0,
                      "log_every": args.steps},
            "logging": {"report_to": "none"},
            "output": {"dir": str(work / name)},
        })
        started = time.perf_counter()
        train(config, log=lambda _msg: None)
        return args.steps / (time.perf_counter() - started)

    plain = run("plain")
    first = run("cached-cold", cache_latents=True, cache_text=True)
    warm = run("cached-warm", cache_latents=True, cache_text=True)
    print(f"\n{args.steps} steps, {args.images} images at {args.resolution} px (whole run incl. model load):")
    print(f"  no caching:                 {plain:6.2f} steps/s")
    print(f"  caching, cache filled now:  {first:6.2f} steps/s")
    print(f"  caching, cache reused:      {warm:6.2f} steps/s")


if __name__ == "__main__":
    main()
