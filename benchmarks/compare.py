"""difftune against the diffusers LoRA example, step for step, on the same model, data and settings.

Run (CPU, a few minutes)::

    PYTHONPATH=src python benchmarks/compare.py [--example path/to/train_text_to_image_lora.py]
        [--steps 15] [--warmup 5] [--repeats 3] [--threads N] [--variant NAME:key=value,...]

The model is Stable Diffusion 1.5's architecture with the UNet at half width (block channels
160/320/640/640), the full-size VAE and CLIP text encoder, random weights built from configs
(``sd15.py``), written once as a diffusers folder under ``--cache``. The tokenizer is difftune's
character-level CLIP tokenizer (the real BPE one cannot be had offline); prompts are padded to 77
tokens either way. The data are 16 generated 256 px images with captions.

Each tool runs as a child process with the same thread count: ``difftune train`` with a config
(LoRA rank 4, bf16 autocast, batch 1, latents and prompt embeddings cached), and, with
``--example``, the diffusers example script with ``--resolution 256 --train_batch_size 1 --rank 4
--mixed_precision bf16``. Runs are interleaved (A B A B ...) so load from other processes hits all
of them alike. A step's time is read from each tool's progress bar as it arrives (both use
tqdm), so both are measured the same way: steady-state seconds per step = time from step
``warmup`` to the last step, divided by the steps between. Peak memory is each child's peak RSS
(``os.wait4``). The UNet's FLOPs per step are counted with ``FlopCounterMode`` and compared with
a bf16 matmul measured here. ``--profile`` then runs ``step_profile.py``: where difftune's step
spends its time by kernel class, and the most that removing everything outside the attention,
convolution and matmul kernels could give against the example.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROGRESS = re.compile(r"(\d+)/(\d+) \[")


@dataclass
class Tool:
    name: str
    command: list[str]
    bar: str  # the tqdm description of the training bar
    outputs: list[Path] = field(default_factory=list)


@dataclass
class Measurement:
    seconds_per_step: float | None
    peak_rss: int
    returncode: int
    tail: str
    reported: dict | None = None


def run_child(command: list[str], bar: str, env: dict, warmup: int) -> Measurement:
    """Run ``command`` and time its steps from the moment each progress update arrives."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    seen: dict[int, float] = {}
    tail: list[str] = []

    def read() -> None:
        buffer = b""
        while chunk := proc.stdout.read1(65536):
            now = time.perf_counter()
            buffer += chunk
            *parts, buffer = re.split(rb"[\r\n]", buffer)
            for raw in parts:
                text = raw.decode(errors="replace")
                if text.strip():
                    tail.append(text)
                    del tail[:-40]
                if text.lstrip().startswith(bar):
                    match = PROGRESS.search(text)
                    if match:
                        seen.setdefault(int(match.group(1)), now)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    last = max(seen, default=0)
    per_step = None
    if warmup in seen and last > warmup:
        per_step = (seen[last] - seen[warmup]) / (last - warmup)
    return Measurement(per_step, usage.ru_maxrss * 1024, proc.returncode, "\n".join(tail[-15:]))


def difftune_config(model: Path, data: Path, cache: Path, out: Path, steps: int, options: dict) -> str:
    sections: dict[str, dict] = {
        "model": {"path": str(model)},
        "method": {"type": "lora", "rank": 4},
        "data": {"path": str(data), "resolution": 256, "cache_latents": True, "cache_text": True,
                 "cache_dir": str(cache)},
        "train": {"max_steps": steps, "batch_size": 1, "learning_rate": 1e-4, "mixed_precision": "bf16",
                  "checkpoint_every": 0, "log_every": steps},
        "logging": {"report_to": "none"},
        "output": {"dir": str(out)},
    }
    for key, value in options.items():
        section, name = key.split(".", 1)
        sections[section][name] = value
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:train.channels_last=true,data.cache_latents=false`` -> (NAME, {key: value})."""
    name, _, spec = text.partition(":")
    options = {}
    for item in filter(None, spec.split(",")):
        key, _, raw = item.partition("=")
        options[key.strip()] = json.loads(raw) if raw not in ("", None) and raw[0] in "0123456789-tf[{\"" else raw
    return name, options


def unet_figures(model: Path, threads: int) -> tuple[float, float]:
    import torch
    from diffusers import UNet2DConditionModel
    from sd15 import add_lora, matmul_peak, unet_step_flops

    torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    unet.requires_grad_(False).to(torch.bfloat16)
    add_lora(unet)
    flops = unet_step_flops(unet, latent=256 // 8)
    return flops, max(matmul_peak(torch.bfloat16) for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", type=Path, help="path to diffusers' train_text_to_image_lora.py")
    parser.add_argument("--steps", type=int, default=15, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state figure")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool, interleaved")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS for every run")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "difftune-bench",
                        help="where the model, data and latent cache are kept between runs")
    parser.add_argument("--unet-width", type=float, default=0.5, help="UNet channel scale (1.0: full SD 1.5)")
    parser.add_argument("--profile", action="store_true",
                        help="then profile difftune's step by kernel class (step_profile.py) and print the "
                             "largest ratio to the example that work outside those kernels could give")
    parser.add_argument("--variant", action="append", default=[],
                        help="a difftune run to include, NAME:section.key=value,... (repeatable); "
                             "default: one run named difftune with caching on")
    args = parser.parse_args()

    from sd15 import build_pipeline_folder

    from difftune.tiny import make_tiny_dataset

    args.cache.mkdir(parents=True, exist_ok=True)
    model = build_pipeline_folder(args.cache / f"sd15-unet{args.unet_width:g}", unet_width=args.unet_width)
    data = args.cache / "data-16x256"
    if not (data / "metadata.jsonl").is_file():
        make_tiny_dataset(data, n=16, size=256)
    work = Path(tempfile.mkdtemp(prefix="difftune-compare-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    src = HERE.parent / "src"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))

    tools: list[Tool] = []
    variants = [parse_variant(v) for v in args.variant] or [("difftune", {})]
    for name, options in variants:
        cfg = work / f"{name}.toml"
        out = work / f"out-{name}"
        cfg.write_text(difftune_config(model, data, args.cache / "latent-cache", out, args.steps, options))
        tools.append(Tool(name, [sys.executable, "-m", "difftune", "train", str(cfg)], "train", [out]))
    if args.example:
        # torchvision is replaced by the stand-in in torchvision_shim/ when it is not installed.
        missing = [m for m in ("datasets",) if importlib.util.find_spec(m) is None]
        runner = [] if importlib.util.find_spec("torchvision") else [str(Path(__file__).parent / "run_diffusers_example.py")]
        if missing:
            print(f"note: the example script needs {', '.join(missing)} (pip install {' '.join(missing)}); "
                  "skipping it")
        else:
            out = work / "out-example"
            tools.append(Tool("example", [
                sys.executable, *runner, str(args.example), "--pretrained_model_name_or_path", str(model),
                "--train_data_dir", str(data), "--caption_column", "text", "--resolution", "256",
                "--train_batch_size", "1", "--rank", "4", "--mixed_precision", "bf16",
                "--max_train_steps", str(args.steps), "--learning_rate", "1e-4", "--seed", "42",
                "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0", "--output_dir", str(out),
            ], "Steps", [out]))

    print(f"model: {model} (UNet width ×{args.unet_width:g}); data: 16 images at 256 px; "
          f"{args.threads} thread(s); {args.steps} steps per run, steady state from step {args.warmup}")
    results: dict[str, list[Measurement]] = {t.name: [] for t in tools}
    for repeat in range(args.repeats):
        for tool in tools:
            m = run_child(tool.command, tool.bar, env, args.warmup)
            report = tool.outputs[0] / "logs" / "performance.json"
            if report.is_file():
                m.reported = json.loads(report.read_text())
            results[tool.name].append(m)
            shown = f"{m.seconds_per_step:.3f} s/step" if m.seconds_per_step else "no timing"
            print(f"  run {repeat + 1} {tool.name:>14}: {shown}, peak RSS {m.peak_rss / 2**30:.2f} GiB"
                  + (f" (difftune's own median {m.reported['median_step_seconds']:.3f} s)" if m.reported else ""),
                  flush=True)
            if m.returncode != 0:
                print(f"    exited with {m.returncode}; last output:\n{m.tail}")

    flops, peak = unet_figures(model, args.threads)
    print(f"\nUNet forward + backward: {flops / 1e9:.1f} GFLOP per step; bf16 matmul peak here: "
          f"{peak / 1e9:.0f} GFLOP/s ({args.threads} thread(s))")
    print(f"{'run':>14}  {'s/step (median)':>15}  {'peak RSS':>9}  {'step GFLOP/s':>12}  {'% of matmul':>11}")
    medians = {}
    for name, runs in results.items():
        times = [m.seconds_per_step for m in runs if m.seconds_per_step]
        if not times:
            print(f"{name:>14}  {'failed':>15}")
            continue
        med = medians[name] = statistics.median(times)
        rss = max(m.peak_rss for m in runs)
        rate = flops / med
        print(f"{name:>14}  {med:15.3f}  {rss / 2**30:7.2f} G  {rate / 1e9:12.0f}  {100 * rate / peak:10.0f}%")
    if "example" in medians:
        for name, med in medians.items():
            if name != "example":
                print(f"example / {name}: {medians['example'] / med:.2f}× (higher: {name} is faster)")
    print("(GFLOP/s counts the UNet's FLOPs over the whole step, so it is a lower bound for the UNet itself.)")
    if args.profile:
        ours = next((m for name, m in medians.items() if name != "example"), None)
        example = ["--ratio", f"{medians['example'] / ours:.3f}"] if "example" in medians and ours else []
        print("\nprofile of difftune's step (benchmarks/step_profile.py):", flush=True)
        subprocess.run([sys.executable, str(HERE / "step_profile.py"), "--threads", str(args.threads),
                        "--unet-width", str(args.unet_width), *example], env=env, check=False)


if __name__ == "__main__":
    main()
