"""The model-family seam: everything that differs between architectures lives behind this interface.

The training loop, the data code, the methods and the exporters talk to a family only through
these methods; they never test a family's name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.config.schema import ModelConfig, TrainConfig
from difftune.data.batch import Batch
from difftune.errors import DifftuneError


@dataclass
class ModelSource:
    """Where the base model comes from, resolved before loading."""

    path: str
    kind: str  # "folder", "single_file" or "hub"
    revision: str | None = None
    variant: str | None = None
    # The pipeline class named in model_index.json (folders and Hub ids), if known.
    pipeline_class_name: str | None = None
    # Folder (or Hub id) holding component configs for a single-file checkpoint.
    config_source: str | None = None


@dataclass
class Components:
    """The loaded parts of a text-to-image model.

    ``text_encoders`` and ``tokenizers`` are parallel lists; ``encoder_names`` gives each text
    encoder's pipeline attribute (``text_encoder``, ``text_encoder_2``, ...).
    """

    denoiser: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    source: ModelSource
    encoder_names: list[str] = field(default_factory=lambda: ["text_encoder"])
    #: True while the VAE and text encoders wait on the CPU (both caches on; see ``data.cache``).
    encoders_offloaded: bool = False
    #: The denoiser's config while only the frozen parts are loaded (``load(which="frozen")``), else ``None``.
    denoiser_config: dict[str, Any] | None = None

    def with_modules(self, modules: dict[str, nn.Module]) -> Components:
        """A view with some parts replaced, by role (``denoiser``, ``vae``, ``text_encoder``, ``text_encoder_2``...)."""
        encoders = [modules.get(name, encoder) for name, encoder in zip(self.encoder_names, self.text_encoders,
                                                                         strict=True)]
        return dataclasses.replace(self, denoiser=modules.get("denoiser", self.denoiser), vae=modules.get("vae", self.vae),
                                   text_encoders=encoders)

    def by_role(self) -> dict[str, nn.Module | None]:
        """Every part by role: ``denoiser``, ``vae``, then the text encoders by their pipeline names."""
        return {"denoiser": self.denoiser, "vae": self.vae, **dict(zip(self.encoder_names, self.text_encoders,
                                                                        strict=True))}


def vae_shift(vae) -> float:
    """The VAE's latent ``shift_factor`` (SD3 and Flux have one; SD and SDXL none: 0)."""
    return getattr(vae.config, "shift_factor", None) or 0.0


class ModelFamily(ABC):
    """One model architecture. Subclasses are registered in ``difftune.models.FAMILIES``."""

    #: Registry name, e.g. ``sd1``.
    name: str = ""
    #: Human-readable name for messages and model cards.
    title: str = ""
    #: Name of the objective in ``difftune.objectives.OBJECTIVES``.
    objective: str = "ddpm"
    #: Attribute name of the denoiser in the pipeline and prefix of its LoRA keys.
    denoiser_name: str = "unet"
    #: Default LoRA targets in the denoiser and in the text encoders.
    default_lora_targets: tuple[str, ...] = ()
    default_text_encoder_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    #: Tags for the model card.
    card_tags: tuple[str, ...] = ()
    #: Keys of a textual-inversion file, one per text encoder, for families with several encoders
    #: (SDXL: ``("clip_l", "clip_g")``, as diffusers' SDXL examples load them). ``None``: the encoder names.
    embedding_save_keys: tuple[str, ...] | None = None
    #: The diffusers scheduler class pipelines sample with (validation, class images).
    sampling_scheduler: str = "DPMSolverMultistepScheduler"
    #: Further pipeline arguments, e.g. no safety checker.
    pipeline_kwargs: dict[str, Any] = {}
    #: True if the family converts its weights to one original-layout file (:meth:`save_single_file`).
    writes_single_file: bool = False
    #: How kohya-format LoRA files name this family's modules (:mod:`difftune.models.kohya_names`);
    #: ``None``: the diffusers module names with ``.`` -> ``_`` (the UNet families).
    kohya_names: Any = None
    #: Tools that load this family's LoRA files in kohya layout with every key and the trained scale
    #: (``comfyui``, ``a1111``, ``forge``; the rules are in docs/tools.md). Runs write a file for them.
    lora_tools: tuple[str, ...] = ("comfyui", "a1111", "forge")
    #: Header entries of those files that tools read: A1111's LoRA picker lists a file under an
    #: SDXL / SD 2 model only if ``ss_base_model_version`` / ``ss_v2`` say so.
    tool_metadata: dict[str, str] = {"ss_base_model_version": "sd_v1"}
    #: Keys of an embedding file for ComfyUI / A1111 / Forge, one per text encoder: ComfyUI picks the key
    #: named by each tokenizer's ``embedding_key`` (``clip_l``, ``clip_h``, ``clip_g``, ``t5xxl``).
    tool_embedding_keys: tuple[str, ...] = ("clip_l",)
    #: How many pixels one latent position covers along each side (the VAE's downscale).
    latent_downscale: int = 8

    def __init__(self, model: ModelConfig | None = None, train: TrainConfig | None = None) -> None:
        #: The run's ``[model]`` section: load options (``vae``, ``quantize``). Schema defaults if not given.
        self.model = model if model is not None else ModelConfig()
        #: The run's ``[train]`` section: training options a family applies (``guidance_scale``).
        self.train = train if train is not None else TrainConfig()

    # --- detection and loading -------------------------------------------------------------

    #: ``_class_name`` values in ``model_index.json`` that this family loads.
    pipeline_class_names: tuple[str, ...] = ()
    #: diffusers' inferred types of single-file checkpoints this family loads (``v1``, ``xl_base``, ...).
    single_file_types: tuple[str, ...] = ()

    @classmethod
    def matches(cls, source: ModelSource, single_file_type: str | None) -> bool:
        """True if this family can load ``source``.

        ``single_file_type`` is diffusers' inferred model type for a single-file checkpoint
        (``v1``, ``v2``, ``xl_base``, ...), else ``None``.
        """
        if single_file_type is not None:
            return single_file_type in cls.single_file_types
        return source.pipeline_class_name in cls.pipeline_class_names

    def denoiser_parameters(self, source: ModelSource) -> int | None:
        """How many numbers the denoiser of ``source`` holds, read from safetensors headers (no tensor is
        loaded): the denoiser's folder, or the whole file of a single-file checkpoint (an over-count: it holds
        the VAE and text encoders too). ``None`` where it cannot be told without downloading (a Hub id, or
        weights not in safetensors)."""
        if source.kind == "single_file":
            files = [Path(source.path)] if str(source.path).endswith(".safetensors") else []
        elif source.kind == "folder":
            infix = f".{source.variant}." if source.variant else None
            files = [f for f in sorted((Path(source.path) / self.denoiser_name).glob("*.safetensors"))
                     if (infix in f.name if infix else f.name.count(".") == 1)]
        else:
            files = []
        try:
            counts = [_tensor_numbers(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        except OSError:
            return None  # loading says what is wrong with the file
        return None if not counts or None in counts else sum(counts)

    @abstractmethod
    def load(self, source: ModelSource, *, dtype: torch.dtype, which: str = "all") -> Components:
        """Load every component on the CPU in ``dtype`` (the loop moves them to the device).

        ``which = "frozen"`` loads all but the denoiser (``None``), ``"denoiser"`` only the denoiser
        (the rest ``None``): a run that caches every input encodes with the former, releases it, then
        loads the latter, so the two never share memory.
        """

    @abstractmethod
    def pipeline_class(self) -> type:
        """The diffusers pipeline class for sampling and LoRA loading."""

    # --- the training step -------------------------------------------------------------------

    @abstractmethod
    def encode_prompt(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise (with truncation) and encode captions into the denoiser's conditioning."""

    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        """Encode images in [-1, 1] to latents normalised by the VAE's shift and scaling factors (a sample
        of :meth:`latent_distribution`). This default covers every ``AutoencoderKL``."""
        vae = components.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample()
        return (latents - vae_shift(vae)) * vae.config.scaling_factor

    def decode_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents to images in [-1, 1] (the inverse of :meth:`encode_images`)."""
        vae = components.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae_shift(vae)
        return vae.decode(latents, return_dict=False)[0]

    @abstractmethod
    def predict(
        self,
        components: Components,
        denoiser: nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        batch: Batch,
    ) -> torch.Tensor:
        """Run ``denoiser`` (possibly wrapped for distributed training) on one batch (its sizes, for SDXL)."""

    #: Block names of the denoiser for ``method.block_lr``: a pattern whose groups are the block kind and index.
    block_pattern: str = r"^(down|up)_blocks\.(\d+)\.|^(mid)_block\."

    def block_of(self, parameter: str) -> tuple[str, int | None] | None:
        """The denoiser block a parameter belongs to, as ``(kind, index)`` (``("down", 1)``, ``("mid", None)``,
        ``("", 7)`` for transformer block 7); ``None`` outside the blocks (embeddings, in/out layers)."""
        import re

        m = re.match(self.block_pattern, parameter)
        if not m:
            return None
        kind, index = [g for g in m.groups() if g is not None][0], None
        rest = [g for g in m.groups()[1:] if g is not None and g.isdigit()]
        if kind.isdigit():
            kind, index = "", int(kind)
        elif rest:
            index = int(rest[0])
        return kind, index

    def objective_settings(self, components: Components) -> dict[str, Any]:
        """Settings the objective needs from the model (e.g. ``prediction_type``)."""
        return {"noise_scheduler": components.noise_scheduler}

    def latent_distribution(self, components: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the scaled latents of images in [-1, 1], for the latent cache.

        ``mean + std * N(0, 1)`` is distributed as what :meth:`encode_images` samples. This default
        covers VAEs with a ``scaling_factor`` and an optional ``shift_factor``.
        """
        vae = components.vae
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        scale = vae.config.scaling_factor
        return (dist.mean.float() - vae_shift(vae)) * scale, dist.std.float() * scale

    def load_tokenizers(self, source: ModelSource) -> list[Any]:
        """Just the tokenizers (for caption length checks); empty when they cannot be loaded alone."""
        return []

    # --- sampling and export -----------------------------------------------------------------

    def build_pipeline(self, components: Components, denoiser: nn.Module, text_encoders: list[nn.Module]):
        """An inference pipeline built from in-memory components (nothing is reloaded): ``denoiser`` and
        ``text_encoders`` (e.g. trained copies) with the loaded VAE and tokenizers, sampling with
        :attr:`sampling_scheduler`."""
        import diffusers

        scheduler = getattr(diffusers, self.sampling_scheduler).from_config(components.noise_scheduler.config)
        parts = {self.denoiser_name: denoiser, "vae": components.vae, "scheduler": scheduler, **self.pipeline_kwargs}
        for name, encoder, tokenizer in zip(components.encoder_names, text_encoders, components.tokenizers,
                                            strict=True):
            parts[name] = encoder
            parts[name.replace("text_encoder", "tokenizer")] = tokenizer
        return self.pipeline_class()(**parts)

    def save_single_file(
        self,
        components: Components,
        path: str | Path,
        denoiser: nn.Module | None = None,
        text_encoders: list[nn.Module] | None = None,
        *,
        dtype: torch.dtype | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Path:
        """Write the whole model as one original-layout ``.safetensors`` file (A1111 / ComfyUI).

        ``denoiser`` and ``text_encoders`` replace the loaded ones (e.g. fine-tuned or fused
        copies); adapters must already be merged into them.
        """
        raise DifftuneError(f"single-file export is not supported for {self.title}")

    def lora_encoder_names(self, components: Components) -> list[str]:
        """Text encoders that LoRA may train (``method.train_text_encoder``): those whose LoRA keys this
        family's diffusers pipeline loads. Default: all of them; SD3 and Flux leave out T5."""
        return list(components.encoder_names)

    def lora_prefixes(self, components: Components) -> list[str]:
        """Key prefixes of the saved LoRA file: denoiser first, then each text encoder."""
        return [self.denoiser_name, *components.encoder_names]

    def denoiser_config_hash(self, components: Components) -> str:
        import hashlib

        cfg = dict(components.denoiser.config)
        text = json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _tensor_numbers(path: str, size: int, mtime_ns: int) -> int | None:
    """How many numbers a safetensors file holds, from its header (no tensor is read); ``None`` if it is not
    a safetensors file. Cached per file version (``size``, ``mtime_ns``): a run asks for it several times."""
    import math

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not iterable
            return sum(math.prod(handle.get_slice(name).get_shape()) for name in names)
    except (OSError, SafetensorError):
        return None
