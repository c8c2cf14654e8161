"""Where the time of a cached LoRA step goes, kernel class by kernel class, and what that bounds.

Run (CPU, about a minute)::

    PYTHONPATH=src python benchmarks/step_profile.py [--threads N] [--steps 8] [--unet-width 0.5]
        [--ratio 2.7]

It runs difftune's steady-state training step on the benchmark UNet (SD 1.5 architecture, half
width, random weights, ``sd15.py``) as a run with cached latents and prompt embeddings does: bf16
frozen weights under bf16 autocast, a rank-4 LoRA on the attention projections in fp32 with peft's
input casts skipped (``performance.skip_lora_input_casts``) and a fused AdamW step, at 256 px (32×32 latents), batch 1.

It prints the median wall time of a step, then the profiled time per step of each kernel class —
attention (PyTorch's flash-attention kernel), convolutions (oneDNN, forward and input gradients),
matrix products — with its FLOPs and GFLOP/s, the rest (norms, activations, adds, copies) and the
Python/dispatch time between kernels; then each attention shape on its own. With ``--ratio`` (the
example's s/step over difftune's, measured side by side by ``compare.py``) it prints the most any
change outside those three kernel classes could make of that ratio: the ratio divided by the share
of the step spent inside them. A share, not seconds, because this machine's speed drifts by tens of
percent between runs while the shares hold.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

CLASSES = {
    "attention": ("scaled_dot_product",),
    "convolution": ("mkldnn_convolution", "convolution_backward"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
}


def kernel_class(name: str) -> str:
    for cls, markers in CLASSES.items():
        if any(marker in name for marker in markers):
            return cls
    return "other"


def build_step(width: float):
    import torch
    from diffusers import UNet2DConditionModel
    from sd15 import add_lora, build_pipeline_folder

    from difftune.training import performance

    # Loaded from the benchmark folder the way difftune loads it (fp32 file to bf16). Built in place
    # instead, glibc's malloc keeps its small initial mmap threshold and every step page-faults its
    # activations back in (~16,000 faults, ~10 % of the step), which a real run never does.
    folder = build_pipeline_folder(Path.home() / ".cache" / "difftune-bench" / f"sd15-unet{width:g}", width)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.bfloat16).requires_grad_(False)
    add_lora(unet)

    performance.skip_lora_input_casts(SimpleNamespace(denoiser=unet, text_encoders=[]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    latents = torch.randn(1, 4, 32, 32, dtype=torch.bfloat16)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)

    def step():
        noise = torch.randn(latents.shape)
        t = torch.randint(0, 1000, (1,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = unet(latents.float() + noise, t, encoder_hidden_states=text, return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction.float(), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return unet, step


def flops_by_class(unet) -> tuple[dict[str, float], dict[tuple, float]]:
    """FLOPs of one forward+backward per kernel class, and of each attention call shape."""
    import torch
    from sd15 import count_unet_step
    from torch.utils._python_dispatch import TorchDispatchMode

    attention: dict[tuple, float] = defaultdict(float)

    class Attention(TorchDispatchMode):
        """Counts attention FLOPs: 4·B·H·Nq·Nk·D forward, twice that backward (dQ, dK, dV, dP)."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
                q, k = args[0], args[1]
                b, h, nq, d = q.shape
                attention[(nq, k.shape[2], d)] += 12 * b * h * nq * k.shape[2] * d
            return func(*args, **(kwargs or {}))

    counter = count_unet_step(unet, latent=32, modes=(Attention(),))
    totals: dict[str, float] = defaultdict(float)
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = str(op)
        totals["convolution" if "convolution" in name else "matmul"] += flops
    totals["attention"] = sum(attention.values())
    return totals, attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--unet-width", type=float, default=0.5)
    parser.add_argument("--ratio", type=float, help="example s/step ÷ difftune s/step, as compare.py measured it")
    args = parser.parse_args()

    import torch
    from sd15 import matmul_peak
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    unet, step = build_step(args.unet_width)
    for _ in range(3):
        step()
    wall = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        wall.append(time.perf_counter() - started)
    seconds = statistics.median(wall)

    profiled = max(2, args.steps // 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(profiled):
            step()
        profiled_seconds = (time.perf_counter() - started) / profiled
    by_class: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_class[kernel_class(event.key)] += event.self_cpu_time_total / 1e6 / profiled
    ops_total = sum(by_class.values())
    flops, attention_shapes = flops_by_class(unet)
    peak = max(peak, matmul_peak())  # the better of two readings, before and after: the machine drifts

    print(f"UNet width ×{args.unet_width:g}, LoRA rank 4, 256 px, batch 1, bf16, {args.threads} thread(s); "
          f"bf16 matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"step: {seconds:.3f} s median wall time ({args.steps} steps); {profiled_seconds:.3f} s per step under "
          "the profiler (which adds overhead to every kernel call), of which:\n")
    print(f"{'kernels':>14} {'s/step':>8} {'GFLOP':>7} {'GFLOP/s':>8} {'% of peak':>10}")
    for cls in (*CLASSES, "other"):
        t = by_class[cls]
        if cls in flops:
            rate = flops[cls] / t
            print(f"{cls:>14} {t:8.3f} {flops[cls] / 1e9:7.1f} {rate / 1e9:8.0f} {100 * rate / peak:9.0f}%")
        else:
            print(f"{cls:>14} {t:8.3f}")
    heavy = sum(by_class[c] for c in CLASSES)
    print(f"{'between':>14} {max(0.0, profiled_seconds - ops_total):8.3f}  (inside no kernel: Python, dispatch, "
          "the profiler's own work)")

    print("\nattention calls per step (query tokens, key tokens, head width): time fwd+bwd, GFLOP/s")
    for (nq, nk, d), f in sorted(attention_shapes.items(), key=lambda item: -item[1]):
        t = _time_attention(nq, nk, d, heads=8)
        calls = round(f / (12 * 8 * nq * nk * d))
        print(f"  {nq:5d} × {nk:5d}, d={d:3d}: {calls:2d} calls × {t * 1e3:6.2f} ms = {calls * t * 1e3:6.1f} ms, "
              f"{f / calls / t / 1e9:5.0f} GFLOP/s")

    share = heavy / profiled_seconds
    print(f"\nattention, convolution and matmul kernels: {100 * share:.0f} % of the step")
    if args.ratio:
        print(f"measured ratio to the example {args.ratio:.2f}×; with everything outside those kernels removed it "
              f"could reach at most {args.ratio:.2f} / {share:.2f} = {args.ratio / share:.2f}×")


def _time_attention(nq: int, nk: int, d: int, heads: int, repeats: int = 15) -> float:
    import torch
    import torch.nn.functional as F

    q = torch.randn(1, heads, nq, d, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, heads, nk, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, heads, nq, d, dtype=torch.bfloat16)
    times = []
    for i in range(repeats + 3):
        started = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v).backward(grad)
        if i >= 3:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


if __name__ == "__main__":
    main()
