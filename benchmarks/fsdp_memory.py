"""Peak memory per process while a UNet trains in full: 1 process against 2 processes sharded with FSDP2.

Run: ``PYTHONPATH=src python benchmarks/fsdp_memory.py [--steps 3] [--widths 192,384 320,640]``.
Prints figures; it is not a test. Each measurement is a ``torchrun --nproc_per_node N`` launch on
127.0.0.1 (gloo, CPU, 1 OpenMP thread per process) of this script's worker: it builds an SD-style
UNet on the meta device (no memory), shards it with difftune's own
``training.distributed.shard`` when N > 1 (the same per-block ``fully_shard`` a run uses), allocates
this process's part (random fp32 weights, 2 resnets per block), makes AdamW,
then resets the kernel's peak-RSS counter and runs a few full training steps (batch 1, 8×8 latents,
so activations are small next to the weights). What it reports per process is the peak resident
memory during those steps minus the resident memory before the UNet was built: the weights,
gradients and optimizer state this process holds, plus what is gathered while a block computes.

The prediction it is checked against (docs/scaling.md uses the same arithmetic for SD 1.5, SDXL and
Flux): 16 bytes per trained parameter (fp32 weight 4, gradient 4, AdamW moments 8), divided by N
under FSDP, plus the largest FSDP unit unsharded (its fp32 weights and gradient) while it computes.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import subprocess
import sys
from pathlib import Path


def unet_kwargs(channels: tuple[int, ...]) -> dict:
    n = len(channels)
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
                down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
                cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)


def kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(channels: tuple[int, ...], steps: int) -> None:
    import torch
    import torch.distributed as dist
    from diffusers import UNet2DConditionModel
    from torch.distributed.tensor import DTensor

    from difftune.training.distributed import blocks, shard

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    gc.collect()
    before = kib("VmRSS")
    with torch.device("meta"):  # built without memory, as a large model would be; sharded before it is allocated
        unet = UNet2DConditionModel(**unet_kwargs(channels))
    total = sum(p.numel() for p in unet.parameters())
    owner = {}  # each parameter belongs to the innermost FSDP unit around it
    for unit in [unet, *reversed(blocks(unet))]:
        owner.update({id(p): id(unit) for p in unit.parameters()})
    sizes: dict[int, int] = {}
    for p in unet.parameters():
        sizes[owner[id(p)]] = sizes.get(owner[id(p)], 0) + p.numel()
    largest = max(sizes.values())
    if world > 1:
        shard({"denoiser": unet}, None)
    unet.to_empty(device="cpu")
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02)
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in unet.parameters())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    for _ in range(steps):
        out = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 8, 64)).sample
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = kib("VmHWM")
    print(f"RESULT rank={rank} world={world} params={total} held={held} largest_unit={largest} "
          f"peak_mib={(peak - before) / 1024:.1f}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(width: str, processes: int, steps: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker", width, "--steps", str(steps)]
    # A fixed mmap threshold: glibc otherwise raises it after the first large free and keeps the
    # per-block gather buffers in its heap, which shows as ~0.6 GiB more RSS at 108 M parameters
    # (allocator fragmentation on CPU, not memory the training holds).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            rows.append({k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])})
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--widths", nargs="+", default=["192,384", "320,640"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(tuple(int(c) for c in args.worker.split(",")), args.steps)
        return
    print("UNet widths | params | processes | params held per process | measured peak per process | "
          "predicted (16 B/param / N + largest unit unsharded, 8 B/param)")
    for width in args.widths:
        for processes in (1, 2):
            for r in launch(width, processes, args.steps):
                predicted = 16 * r["params"] / processes + (8 * r["largest_unit"] if processes > 1 else 0)
                print(f"{width} | {r['params'] / 1e6:.1f} M | {processes} (rank {int(r['rank'])}) | "
                      f"{r['held'] / 1e6:.2f} M | {r['peak_mib']:.0f} MiB | {predicted / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
