"""The private diffusers helpers ``models/flux.py`` relies on, pinned against what Flux training needs.

``FluxPipeline._pack_latents``, ``_unpack_latents`` and ``_prepare_latent_image_ids`` are not public
API; if a diffusers release changed them, these tests say so before training silently learns the
wrong layout. The expectations are written out element by element, not by calling the helpers twice.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline


def test_pack_latents_makes_a_sequence_of_2x2_patches_row_by_row():
    b, c, h, w = 2, 3, 4, 6
    latents = torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    assert packed.shape == (b, (h // 2) * (w // 2), c * 4)
    for n in range(b):
        for row in range(h // 2):
            for col in range(w // 2):
                token = packed[n, row * (w // 2) + col]
                # Channels first, then the patch's 2×2 pixels in row-major order.
                expected = torch.stack([latents[n, ch, 2 * row + dy, 2 * col + dx]
                                        for ch in range(c) for dy in range(2) for dx in range(2)])
                assert torch.equal(token, expected)


def test_unpack_with_scale_one_takes_latent_sizes_and_inverts_packing():
    b, c, h, w = 1, 4, 6, 8
    latents = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    assert torch.equal(FluxPipeline._unpack_latents(packed, h, w, 1), latents)


def test_image_ids_are_zero_row_column_per_patch():
    ids = FluxPipeline._prepare_latent_image_ids(1, 2, 3, torch.device("cpu"), torch.float32)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
