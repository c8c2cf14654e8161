"""Train the judge from renders: ``python -m difftune.world judge --out judge.safetensors``.

The training images are renders of every concept (held-out ones included), degraded the ways a
small diffusion model's samples differ from renders: blur, noise, colour drift, small shifts and
smooth warps of the outline. Accuracy is then measured per attribute on fresh renders (seeds the
training never used), with and without those degradations.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difftune.world import grammar as g
from difftune.world.judge import INPUT_SIZE, JudgeNet
from difftune.world.render import render
from difftune.world.scene import EVERYTHING, Scene


def render_pool(n: int, seed: int, size: int = INPUT_SIZE) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` renders of random scenes from every concept: uint8 (n, 3, size, size) and label indices."""
    rng = random.Random(f"judge/{seed}")
    images = np.empty((n, size, size, 3), np.uint8)
    labels = {name: torch.empty(n, dtype=torch.long) for name in g.ATTRIBUTES}
    for i in range(n):
        scene = EVERYTHING.sample(rng)
        images[i] = np.asarray(render(scene, size))
        for name, values in g.ATTRIBUTES.items():
            labels[name][i] = values.index(getattr(scene, name))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (pixels); sigma 0 leaves it unchanged."""
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N, 7)
    n, c, h, w = x.shape
    flat = x.reshape(1, n * c, h, w)
    k = kernel.repeat_interleave(c, 0)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def degrade(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random degradations of a batch in [0, 1] that keep every attribute readable to a person."""
    n = pixels.shape[0]

    def u(lo, hi, *shape):
        return torch.rand(n, *shape, generator=gen) * (hi - lo) + lo

    # Small shift, scale and rotation, plus a smooth random warp of the outline.
    angle = u(-4, 4) * math.pi / 180
    scale = u(0.96, 1.04)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * torch.cos(angle)
    theta[:, 0, 1] = -scale * torch.sin(angle)
    theta[:, 1, 0] = scale * torch.sin(angle)
    theta[:, 1, 1] = scale * torch.cos(angle)
    theta[:, :, 2] = u(-0.06, 0.06, 2)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    warp = torch.randn(n, 2, 4, 4, generator=gen) * u(0, 0.03)[:, None, None, None]
    grid = grid + F.interpolate(warp, size=pixels.shape[-2:], mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    x = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Blur (as a VAE decoder softens edges), colour drift, then noise.
    blurred = torch.rand(n, generator=gen) < 0.7
    x = torch.where(blurred[:, None, None, None], _gaussian_blur(x, u(0.3, 1.2)), x)
    gain = u(0.92, 1.08, 1, 1, 1) * u(0.95, 1.05, 3, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.85, 1.1, 1, 1, 1) + mean
    x = x * gain + u(-0.03, 0.03, 3, 1, 1)
    x = x + torch.randn(x.shape, generator=gen) * u(0, 0.05, 1, 1, 1)
    return x.clamp(0, 1)


def accuracy(net: JudgeNet, images: torch.Tensor, labels: dict[str, torch.Tensor],
             gen: torch.Generator | None = None) -> dict[str, float]:
    """Per-attribute accuracy on uint8 images (degraded with ``gen`` if given)."""
    net.eval()
    correct = {name: 0 for name in g.ATTRIBUTES}
    with torch.no_grad():
        for start in range(0, len(images), 512):
            x = images[start:start + 512].float() / 255
            if gen is not None:
                x = degrade(x, gen)
            logits = net(x)
            for name in g.ATTRIBUTES:
                correct[name] += int((logits[name].argmax(-1) == labels[name][start:start + 512]).sum())
    return {name: c / len(images) for name, c in correct.items()}


def train_judge(out: str | Path, *, steps: int = 2500, batch_size: int = 128, pool: int = 20000,
                seed: int = 0, log=print) -> dict[str, float]:
    """Train the judge, save it (fp16 safetensors) to ``out``, and return its accuracy on fresh renders."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    started = time.perf_counter()
    images, labels = render_pool(pool, seed)
    log(f"rendered {pool} training images in {time.perf_counter() - started:.0f} s")
    net = JudgeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(1, steps + 1):
        index = torch.randint(0, pool, (batch_size,), generator=gen)
        x = degrade(images[index].float() / 255, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        loss = sum(F.cross_entropy(logits[name].float(), labels[name][index]) for name in g.ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps:
            log(f"step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
            net.train()
    net.eval()
    test_images, test_labels = render_pool(4000, seed + 1_000_003)
    clean = accuracy(net, test_images, test_labels)
    degraded = accuracy(net, test_images, test_labels, torch.Generator().manual_seed(seed + 1))
    log("accuracy on 4000 fresh renders: " + ", ".join(f"{k} {v:.2%}" for k, v in clean.items()))
    log("           degraded the same way: " + ", ".join(f"{k} {v:.2%}" for k, v in degraded.items()))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in net.state_dict().items()}
    save_file(state, str(out), metadata={"format": "pt", "steps": str(steps), "seed": str(seed)})
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.0f} s")
    return clean


def fresh_accuracy(judge, n: int = 1000, seed: int = 12345, size: int = INPUT_SIZE) -> dict[str, float]:
    """Accuracy of a loaded :class:`~difftune.world.judge.Judge` on ``n`` fresh renders, per attribute."""
    from difftune.world.judge import agreement

    rng = random.Random(f"judge-test/{seed}")
    scenes: list[Scene] = [EVERYTHING.sample(rng) for _ in range(n)]
    verdicts = judge([render(s, size) for s in scenes])
    return agreement(verdicts, [s.attributes() for s in scenes])
