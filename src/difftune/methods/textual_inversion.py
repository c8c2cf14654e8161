"""Textual inversion: learn the embedding of new placeholder tokens; every other weight stays frozen.

The result is ``learned_embeds.safetensors``, which ``pipe.load_textual_inversion(folder, token=...)``
loads; families with several text encoders get one entry per encoder under the family's save keys
(``clip_l`` / ``clip_g`` for SDXL), as diffusers' SDXL examples load them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.methods import embeddings
from difftune.methods.base import Method
from difftune.models.base import Components


def embedding_save_keys(family, components: Components) -> list[str] | None:
    """Per-encoder keys of the embeddings file, from the family (``None``: use the encoder names)."""
    keys = family.embedding_save_keys
    return list(keys) if keys and len(keys) == len(components.text_encoders) else None


class TextualInversion(embeddings.LearnsTokens, Method):
    """Only new placeholder-token embeddings (1–N vectors each) in every text encoder."""

    name = "textual_inversion"

    def prepare(self, components: Components) -> None:
        for module in (components.denoiser, components.vae, *components.text_encoders):
            module.requires_grad_(False)
        self.add_tokens(components)

    def trainable_modules(self, components: Components) -> dict[str, nn.Module]:
        return dict(zip(components.encoder_names, components.text_encoders, strict=True))

    def param_groups(self, components: Components, learning_rate: float) -> list[dict[str, Any]]:
        return [{"params": self.embeddings.embedding_weights(components), "lr": learning_rate, "name": "token embeddings"}]

    def on_step_end(self, step: int, components: Components) -> None:
        self.embeddings.restore(components)

    def trainable_state_dict(self, components: Components) -> dict[str, torch.Tensor]:
        return self.embeddings.state_dict(components)

    def load_trainable_state_dict(self, components: Components, state: dict[str, torch.Tensor]) -> None:
        self.check_state_keys(components, state)
        self.embeddings.load_state_dict(components, state)

    def export(self, components: Components, out_dir: Path, metadata: dict[str, str]) -> list[Path]:
        return self.embeddings.export(components, out_dir, embedding_save_keys(self.family, components), metadata,
                                      self.family)

    def card_details(self) -> dict[str, Any]:
        from difftune.adapters.tools import card_usage

        m = self.cfg
        return {
            "summary": {
                "Method": "Textual inversion",
                "Tokens": ", ".join(f"`{t}`" for t in m.token),
                "Vectors per token": m.num_vectors,
                "Initialised from": ", ".join(f"`{t}`" for t in m.initializer_token),
                "Prompt templates": m.templates,
            },
            "usage": self.usage_code(self.embeddings_load_snippet(), prompt=f"a photo of {m.token[0]}"),
            "tags": ["textual_inversion"],
            "tool_usage": card_usage(self.family, None, list(m.token)),
        }
