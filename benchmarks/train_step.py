"""Training steps per second and peak memory of a full-size SD 1.5 UNet, fp32 against bf16 autocast.

Run: ``PYTHONPATH=src python benchmarks/train_step.py [--steps 4] [--warmup 1] [--repeats 1] [--threads N]``.
Prints figures; it is not a test.

The UNet has Stable Diffusion 1.5's architecture (block channels 320/640/1280/1280) with random
weights built from its config. One step is what difftune runs per step once latents and prompt
embeddings are cached: a rank-4 LoRA on the attention projections (fp32 parameters), a forward
and backward at 256 px (32×32 latents), batch 1, and a foreach AdamW step. ``fp32`` keeps the
frozen weights in fp32 without autocast; ``bf16`` stores them in bf16 and runs under bf16
autocast, as ``train.mixed_precision = "bf16"`` does. Each precision runs in its own child process
(so its peak RSS is its own), interleaved fp32, bf16, fp32, ... and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def one_run(precision: str, steps: int, warmup: int, width: float) -> dict:
    import torch
    from sd15 import add_lora, build_unet

    bf16 = precision == "bf16"
    # Built straight in the weight dtype, so the peak memory is the training step's, not an fp32 copy's.
    torch.set_default_dtype(torch.bfloat16 if bf16 else torch.float32)
    unet = build_unet(width).requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    add_lora(unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    latents, text = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 768)
    times = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            prediction = unet(latents + noise, t, encoder_hidden_states=text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {"seconds_per_step": statistics.median(times[warmup:]), "first_step": times[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--unet-width", type=float, default=1.0)
    parser.add_argument("--child", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child, args.steps, args.warmup, args.unet_width)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, list[tuple[float, int]]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        for precision in results:
            proc = subprocess.Popen(
                [sys.executable, __file__, "--child", precision, "--steps", str(args.steps), "--warmup",
                 str(args.warmup), "--unet-width", str(args.unet_width)], stdout=subprocess.PIPE, env=env)
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"{precision} run failed")
            figures = json.loads(out.decode().strip().splitlines()[-1])
            results[precision].append((figures["seconds_per_step"], usage.ru_maxrss * 1024))
            print(f"  {precision}: {figures['seconds_per_step']:.2f} s/step, peak RSS "
                  f"{usage.ru_maxrss / 2**20:.2f} GiB", flush=True)

    print(f"\nSD 1.5 UNet (width ×{args.unet_width:g}), LoRA rank 4, 256 px, batch 1, {args.threads} thread(s):")
    for precision, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        print(f"  {precision}: {1 / seconds:.3f} steps/s ({seconds:.2f} s/step), "
              f"peak RSS {max(r for _, r in runs) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
