"""New placeholder tokens with trainable embeddings, shared by textual inversion and pivotal tuning.

Each placeholder ``<sks>`` with ``num_vectors = n`` becomes the tokens ``<sks>``, ``<sks>_1``, ...,
``<sks>_{n-1}`` (diffusers' multi-vector naming, so ``load_textual_inversion`` expands prompts the
same way). The tokens are added to every tokenizer and their rows appended to every text encoder's
input embedding; only those rows may change. The optimizer sees the whole embedding matrix (its
weight decay and momentum would move other rows), so :meth:`PlaceholderEmbeddings.restore` writes
the original rows back after every step, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftune.data.batch import Batch
from difftune.errors import ConfigError
from difftune.fileio import save_safetensors
from difftune.models.base import Components
from difftune.seeds import derived_seed

TI_WEIGHT_NAME = "learned_embeds.safetensors"

OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of my {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a rendition of the {}", "a photo of a nice {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a picture in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}", "a clean painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}", "art in the style of {}",
    "a nice painting in the style of {}", "a small painting in the style of {}", "a large painting in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES, "none": ()}


class PlaceholderEmbeddings:
    """The new tokens, their rows in each text encoder, and how they are saved."""

    def __init__(self, tokens: list[str], initializers: list[str], num_vectors: int, templates: str) -> None:
        self.placeholders = list(tokens)
        self.initializers = initializers if len(initializers) == len(tokens) else initializers * len(tokens)
        self.num_vectors = num_vectors
        self.templates = TEMPLATES[templates]
        self.first_new_row: list[int] = []  # per encoder: rows >= this are new
        self.originals: list[torch.Tensor] = []  # per encoder: the rows that must never change
        self.frozen_new: list[torch.Tensor] | None = None  # set when the new rows stop training

    def token_names(self, placeholder: str) -> list[str]:
        return [placeholder] + [f"{placeholder}_{i}" for i in range(1, self.num_vectors)]

    def all_token_names(self) -> list[str]:
        return [name for p in self.placeholders for name in self.token_names(p)]

    # --- set-up ------------------------------------------------------------------------------

    def add(self, components: Components) -> None:
        """Add the tokens to every tokenizer/encoder pair and initialise their rows; make the embedding trainable."""
        names = self.all_token_names()
        for enc_name, tokenizer, encoder in zip(
            components.encoder_names, components.tokenizers, components.text_encoders, strict=True
        ):
            clash = [n for n in names if n in tokenizer.get_vocab()]
            if clash:
                raise ConfigError(f"method.token: {clash[0]!r} is already a token of the {enc_name} tokenizer; pick another")
            init_rows = [self._initial_row(tokenizer, encoder, word, enc_name) for word in self.initializers]
            first = len(tokenizer)
            tokenizer.add_tokens(names)
            encoder.resize_token_embeddings(len(tokenizer))
            weight = encoder.get_input_embeddings().weight
            with torch.no_grad():
                for i, row in enumerate(init_rows):
                    for v in range(self.num_vectors):
                        weight[first + i * self.num_vectors + v] = row
            weight.requires_grad_(True)
            self.first_new_row.append(first)
            self.originals.append(weight.detach()[:first].clone())

    @staticmethod
    def _initial_row(tokenizer, encoder, word: str, enc_name: str) -> torch.Tensor:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise ConfigError(f"method.initializer_token: {word!r} gives no tokens in the {enc_name} tokenizer")
        weight = encoder.get_input_embeddings().weight.detach()
        return weight[ids].float().mean(dim=0).to(weight.dtype)

    def embedding_weights(self, components: Components) -> list[torch.nn.Parameter]:
        return [encoder.get_input_embeddings().weight for encoder in components.text_encoders]

    # --- during training ---------------------------------------------------------------------

    def restore(self, components: Components) -> None:
        """Write back every row that must not change (all old rows; the new ones too once frozen)."""
        with torch.no_grad():
            for k, weight in enumerate(self.embedding_weights(components)):
                first = self.first_new_row[k]
                if self.originals[k].device != weight.device:
                    self.originals[k] = self.originals[k].to(weight.device)
                weight[:first] = self.originals[k]
                if self.frozen_new is not None:
                    weight[first:] = self.frozen_new[k].to(weight.device)

    def freeze_new_rows(self, components: Components) -> None:
        """From now on the new rows keep their current values."""
        if self.frozen_new is None:
            self.frozen_new = [w.detach()[self.first_new_row[k]:].clone()
                               for k, w in enumerate(self.embedding_weights(components))]

    def captions(self, captions: list[str], seeds: list[int] | None = None) -> list[str]:
        """Training prompts: a random template per image (or the caption), with multi-vector tokens expanded.

        With ``seeds`` (one per image) each image's template is drawn from its own seed."""
        out = []
        for i, caption in enumerate(captions):
            if self.templates:
                placeholder = " ".join(self.placeholders)
                g = None if seeds is None else torch.Generator().manual_seed(derived_seed(seeds[i], "template"))
                index = int(torch.randint(len(self.templates), (1,), generator=g).item())
                caption = self.templates[index].format(placeholder)
            out.append(self.expand(caption))
        return out

    def expand(self, text: str) -> str:
        """``<sks>`` → ``<sks> <sks>_1 ...`` as diffusers' pipelines do for multi-vector tokens."""
        if self.num_vectors == 1:
            return text
        for placeholder in self.placeholders:
            text = text.replace(placeholder, " ".join(self.token_names(placeholder)))
        return text

    # --- state and export --------------------------------------------------------------------

    def new_rows(self, components: Components) -> list[torch.Tensor]:
        return [w.detach()[self.first_new_row[k]:].clone() for k, w in enumerate(self.embedding_weights(components))]

    def state_dict(self, components: Components) -> dict[str, torch.Tensor]:
        rows = self.new_rows(components)
        return {f"embeddings.{name}": r for name, r in zip(components.encoder_names, rows, strict=True)}

    def load_state_dict(self, components: Components, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, (name, weight) in enumerate(zip(components.encoder_names, self.embedding_weights(components),
                                                   strict=True)):
                weight[self.first_new_row[k]:] = state[f"embeddings.{name}"].to(weight.device, weight.dtype)

    def export(self, components: Components, out_dir: Path, save_keys: list[str] | None,
               metadata: dict[str, str], family=None) -> list[Path]:
        """One file per placeholder: diffusers' ``{token: (n, dim)}`` for one encoder, else ``{save_key: (n, dim)}``.

        With ``family``, also one file per placeholder for ComfyUI / A1111 / Forge
        (``embeddings_for_comfyui_a1111_forge/<word>.safetensors``, see docs/tools.md).
        """
        from difftune.adapters.tools import write_embedding_tool_file

        rows = self.new_rows(components)
        files = []
        for i, placeholder in enumerate(self.placeholders):
            part = slice(i * self.num_vectors, (i + 1) * self.num_vectors)
            if len(rows) == 1:
                tensors = {placeholder: rows[0][part].float()}
            else:
                keys = save_keys or list(components.encoder_names)
                tensors = {key: r[part].float() for key, r in zip(keys, rows, strict=True)}
            path = out_dir / self.file_name(i)
            save_safetensors(tensors, path, {"format": "pt", "difftune.token": placeholder, **metadata})
            files.append(path)
            if family is not None:
                files.append(write_embedding_tool_file([r[part] for r in rows], family, placeholder, out_dir, metadata))
        return files

    def file_name(self, index: int) -> str:
        return TI_WEIGHT_NAME if len(self.placeholders) == 1 else f"learned_embeds_{index}.safetensors"

    def load_snippet(self, components_encoder_names: list[str], save_keys: list[str] | None,
                     folder: str = "{repo_or_folder}") -> str:
        """Python lines that load the saved embeddings into ``pipe``."""
        lines = []
        if len(components_encoder_names) == 1:
            for i, placeholder in enumerate(self.placeholders):
                weight = "" if self.file_name(i) == TI_WEIGHT_NAME else f', weight_name="{self.file_name(i)}"'
                lines.append(f'pipe.load_textual_inversion("{folder}"{weight}, token="{placeholder}")')
            return "\n".join(lines) + "\n"
        keys = save_keys or list(components_encoder_names)
        lines.append("from safetensors.torch import load_file")
        for i, placeholder in enumerate(self.placeholders):
            lines.append(f'state = load_file("{folder}/{self.file_name(i)}")')
            for key, enc in zip(keys, components_encoder_names, strict=True):
                tok = enc.replace("text_encoder", "tokenizer")
                lines.append(
                    f'pipe.load_textual_inversion(state["{key}"], token="{placeholder}", '
                    f"text_encoder=pipe.{enc}, tokenizer=pipe.{tok})"
                )
        return "\n".join(lines) + "\n"


def from_config(cfg) -> PlaceholderEmbeddings:
    """The placeholder tokens of a ``[method]`` section."""
    return PlaceholderEmbeddings(list(cfg.token), list(cfg.initializer_token), cfg.num_vectors, cfg.templates)


class LearnsTokens:
    """Mixin for methods that learn new placeholder-token embeddings (textual inversion, pivotal).

    Put it before the method base class: ``class TextualInversion(LearnsTokens, Method)``.
    """

    def __init__(self, cfg, family) -> None:
        super().__init__(cfg, family)
        self.embeddings = from_config(cfg)
        self._encoder_names: list[str] = []

    def add_tokens(self, components: Components) -> None:
        """Add the new rows to every text encoder; the embedding tables train in fp32.

        The encoder's residual stream then runs in fp32, so its normalisation layers are kept in fp32
        too: with low-precision frozen weights, CPU autocast (unlike CUDA's) does not cast a layer
        norm's weights to its input's dtype, and a bf16 norm fails on an fp32 input.
        """
        from diffusers.training_utils import cast_training_params

        self.embeddings.add(components)
        self._encoder_names = list(components.encoder_names)
        cast_training_params(components.text_encoders, dtype=torch.float32)
        for encoder in components.text_encoders:
            for module in encoder.modules():
                if "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False)):
                    module.float()

    def prepare_batch(self, batch: Batch) -> Batch:
        return batch.with_captions(self.embeddings.captions(batch.captions, batch.seeds))

    def embeddings_load_snippet(self) -> str:
        """Code that loads the saved embeddings into ``pipe`` (per encoder where there are several)."""
        names = self._encoder_names or ["text_encoder"]
        keys = self.family.embedding_save_keys
        keys = list(keys) if keys and len(keys) == len(names) else None
        return self.embeddings.load_snippet(names, keys)
