"""Pivotal tuning: textual inversion and LoRA trained together.

The new token embeddings and the LoRA layers are separate optimizer groups (``method.text_learning_rate``
for the embeddings); after ``method.embedding_stop_step`` the embeddings keep their values and only
the LoRA trains. Saves the LoRA file and the embeddings file side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.methods import embeddings
from difftune.methods.lora import LoRA
from difftune.methods.textual_inversion import embedding_save_keys
from difftune.models.base import Components


class PivotalTuning(embeddings.LearnsTokens, LoRA):
    """Textual inversion and LoRA together, with separate learning rates and an embedding stop step."""

    name = "pivotal"

    def prepare(self, components: Components) -> None:
        super().prepare(components)  # freezes everything, adds the LoRA layers
        self.add_tokens(components)

    def trainable_modules(self, components: Components) -> dict[str, nn.Module]:
        return {"denoiser": components.denoiser,
                **dict(zip(components.encoder_names, components.text_encoders, strict=True))}

    def param_groups(self, components: Components, learning_rate: float) -> list[dict[str, Any]]:
        from difftune.methods.lr_groups import lr_groups, named_trainable

        table = self.embeddings.embedding_weights(components)
        lora = named_trainable(self.trainable_modules(components), skip={id(p) for p in table})
        text_lr = self.cfg.text_learning_rate or learning_rate
        return [*lr_groups(lora, learning_rate, self.cfg, self.family),
                {"params": table, "lr": text_lr, "name": "token embeddings"}]

    def on_step_end(self, step: int, components: Components) -> None:
        stop = self.cfg.embedding_stop_step
        if stop is not None and step >= stop:
            self.embeddings.freeze_new_rows(components)
        self.embeddings.restore(components)

    def trainable_state_dict(self, components: Components) -> dict[str, torch.Tensor]:
        table = {id(p) for p in self.embeddings.embedding_weights(components)}
        state = {}
        for role, module in self.trainable_modules(components).items():
            for name, p in module.named_parameters():
                if p.requires_grad and id(p) not in table:
                    state[f"{role}.{name}"] = p.detach().clone()
        return {**state, **self.embeddings.state_dict(components)}

    def load_trainable_state_dict(self, components: Components, state: dict[str, torch.Tensor]) -> None:
        self.check_state_keys(components, state)
        self.embeddings.load_state_dict(components, {k: v for k, v in state.items() if k.startswith("embeddings.")})
        self.copy_parameters(components, state, skip_prefix="embeddings.")

    def export(self, components: Components, out_dir: Path, metadata: dict[str, str]) -> list[Path]:
        files = super().export(components, out_dir, metadata)
        return files + self.embeddings.export(components, out_dir, embedding_save_keys(self.family, components),
                                              metadata, self.family)

    def card_details(self) -> dict[str, Any]:
        from difftune.adapters.tools import card_usage

        details = super().card_details()
        m = self.cfg
        details["summary"] = {
            "Method": "Pivotal tuning (textual inversion + " + details["summary"]["Method"] + ")",
            "Tokens": ", ".join(f"`{t}`" for t in m.token) + f" ({m.num_vectors} vector(s) each)",
            "Embedding learning rate": m.text_learning_rate or "train.learning_rate",
            "Embeddings train until step": m.embedding_stop_step if m.embedding_stop_step is not None else "the end",
            **{k: v for k, v in details["summary"].items() if k != "Method"},
        }
        load = "# both parts: the LoRA and the token embeddings\n" + self.load_snippet() + self.embeddings_load_snippet()
        details["usage"] = self.usage_code(load, prompt=f"a photo of {m.token[0]}")
        details["tags"] = [*details["tags"], "textual_inversion", "pivotal-tuning"]
        details["tool_usage"] = card_usage(self.family, m.variant, list(m.token))
        return details
