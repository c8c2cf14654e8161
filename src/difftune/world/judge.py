"""The judge: what a world image shows (shape, colour, size, position, background, style).

A small convolutional network with one classification head per attribute, trained on renders
of every concept (held-out ones included) under augmentations that imitate generated images
(blur, noise, colour drift, small shifts and warps); see :mod:`difftune.world.judge_train`,
which rebuilds the shipped weights (``judge.safetensors`` beside this file).

    >>> from difftune.world import Judge
    >>> judge = Judge.load()
    >>> judge([image])[0]["shape"]
    'circle'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from difftune.world import grammar as g

WEIGHTS = Path(__file__).with_name("judge.safetensors")
INPUT_SIZE = 64


class JudgeNet(nn.Module):
    """Convolutions down to a 4x4 map (which keeps where things are), then one linear head per attribute."""

    def __init__(self, width: int = 32, hidden: int = 192) -> None:
        super().__init__()
        w = width

        def block(cin, cout, stride, kernel=3):
            return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w, 2, kernel=5),                          # 32x32
            *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1),       # 16x16
            *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 1),   # 8x8
            *block(4 * w, 4 * w, 2),                            # 4x4
        )
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in g.ATTRIBUTES.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels``: (N, 3, 64, 64) in [0, 1]. Returns logits per attribute."""
        h = self.trunk(self.features(pixels * 2 - 1))
        return {name: head(h) for name, head in self.heads.items()}


def to_pixels(images: Sequence) -> torch.Tensor:
    """PIL images, HxWx3 uint8 arrays or (3,H,W) tensors in [0, 1] -> an (N, 3, 64, 64) batch."""
    out = []
    for image in images:
        if isinstance(image, torch.Tensor):
            t = image.detach().float().cpu()
            if t.shape[-1] != INPUT_SIZE:
                t = torch.nn.functional.interpolate(t[None], size=(INPUT_SIZE, INPUT_SIZE), mode="area")[0]
            out.append(t.clamp(0, 1))
            continue
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        if image.size != (INPUT_SIZE, INPUT_SIZE):
            image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.BOX)
        out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


class Judge:
    """Says what each image shows. ``verdicts = judge(images)``: one dict per image, attribute -> value."""

    def __init__(self, net: JudgeNet) -> None:
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path | None = None) -> Judge:
        from safetensors.torch import load_file

        path = Path(path) if path else WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no judge weights (rebuild them with python -m difftune.world judge)")
        net = JudgeNet()
        net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        return cls(net)

    @torch.no_grad()
    def probabilities(self, images: Sequence, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Per attribute, an (N, number of values) tensor of probabilities."""
        pixels = to_pixels(images)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in g.ATTRIBUTES}
        for start in range(0, len(pixels), batch_size):
            logits = self.net(pixels[start:start + batch_size])
            for name, value in logits.items():
                parts[name].append(value.softmax(-1))
        return {name: torch.cat(value) for name, value in parts.items()}

    def __call__(self, images: Sequence) -> list[dict[str, str]]:
        probs = self.probabilities(images)
        n = len(next(iter(probs.values())))
        return [{name: g.ATTRIBUTES[name][int(p[i].argmax())] for name, p in probs.items()} for i in range(n)]


def agreement(verdicts: Sequence[dict[str, str]], expected: Sequence[dict[str, str]],
              attributes: Sequence[str] | None = None) -> dict[str, float]:
    """Fraction of images whose verdict matches ``expected``, per attribute.

    An expected dict may leave attributes out (a prompt that does not say the background); only
    the images that state an attribute count for it. ``attributes`` restricts the report.
    """
    names = attributes or tuple(g.ATTRIBUTES)
    result = {}
    for name in names:
        pairs = [(v[name], e[name]) for v, e in zip(verdicts, expected, strict=True) if name in e]
        if pairs:
            result[name] = sum(a == b for a, b in pairs) / len(pairs)
    return result
