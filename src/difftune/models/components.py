"""Loading helpers shared by the model families: sub-folders, a replacement VAE, quantisation, prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difftune.errors import DifftuneError
from difftune.models.base import ModelSource


def load_subfolder(cls: Any, source: ModelSource, subfolder: str, dtype: torch.dtype | None = None, **extra):
    """Load one component from a diffusers folder or Hub id, honouring revision and variant."""
    kwargs: dict[str, Any] = {"subfolder": subfolder, **extra}
    if source.revision:
        kwargs["revision"] = source.revision
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if source.variant:
        kwargs["variant"] = source.variant
    try:
        return cls.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise DifftuneError(f"{source.path}: could not load {subfolder} ({exc})") from None


def quantized_load(mode: str, key: str, dtype: torch.dtype, for_transformers: bool = False):
    """How to load a part quantised to ``mode`` (``model.quantize`` / ``model.quantize_text_encoders``).

    Returns ``(backend, from_pretrained_kwargs)``: bitsandbytes quantises inside diffusers' and
    transformers' loaders (a ``quantization_config``); torchao and optimum-quanto through
    :mod:`difftune.models.streaming`. Checked before any weights load.
    """
    from difftune.models.quantize import backend_for, bitsandbytes_config

    backend = backend_for(mode, key)
    if backend is not None and backend.quantize_linear is None:
        return backend, {"quantization_config": bitsandbytes_config(mode, dtype, for_transformers)}
    return backend, {}


def load_part(cls: Any, source: ModelSource, subfolder: str, dtype: torch.dtype, mode: str, quantized) -> Any:
    """One frozen part of a diffusers folder or Hub id, quantised as ``quantized`` (from :func:`quantized_load`) says."""
    backend, kwargs = quantized
    if backend is None or kwargs:
        return load_subfolder(cls, source, subfolder, dtype, **kwargs)
    from difftune.models.streaming import load_streamed, local_component_folder

    return load_streamed(cls, local_component_folder(source, subfolder), dtype, mode, backend, source.variant)


def load_vae(path: str | None, source: ModelSource, dtype: torch.dtype, default_dtype: torch.dtype):
    """The VAE at ``path`` (``model.vae``: folder or single file) in ``dtype``, else the model's own in
    ``default_dtype``."""
    from diffusers import AutoencoderKL

    if not path:
        return load_subfolder(AutoencoderKL, source, "vae", default_dtype)
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            sub = {"subfolder": "vae"} if (p / "vae" / "config.json").is_file() else {}
            return AutoencoderKL.from_pretrained(p, torch_dtype=dtype, **sub)
        if p.is_file():
            # Offline, a single-file VAE needs its architecture config: take the base model's.
            cfg = {"config": source.path, "subfolder": "vae"} if source.kind == "folder" else {}
            if source.kind == "single_file" and source.config_source:
                cfg = {"config": source.config_source, "subfolder": "vae"}
            return AutoencoderKL.from_single_file(str(p), torch_dtype=dtype, **cfg)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise DifftuneError(f"model.vae: could not load {path} as an AutoencoderKL ({exc})") from None
    raise DifftuneError(f"model.vae: {path} does not exist")


def pipeline_from_single_file(pipe_cls: type, source: ModelSource, dtype: torch.dtype, *, denoiser_name: str,
                              denoiser_cls: type, denoiser_kwargs: dict[str, Any], **pipe_kwargs):
    """Load a whole pipeline from a single-file checkpoint (components it lacks come from ``model.config``).

    With ``denoiser_kwargs`` (quantisation), the denoiser is loaded on its own first and handed in.
    """
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from huggingface_hub.constants import is_offline_mode

    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    hint = (
        "Set model.config to a local diffusers folder of the same architecture (the folder holding "
        "model_index.json, e.g. the model this file was made from)"
    )
    if source.config_source:
        config = Path(source.config_source).expanduser()
        if config.exists() and not (config / "model_index.json").is_file():
            raise DifftuneError(f"model.config: {config} is not a diffusers model folder (no model_index.json). {hint}.")
        kwargs["config"] = str(config) if config.exists() else source.config_source
    elif is_offline_mode():
        # Without model.config diffusers would fetch the component configs from the Hub.
        raise DifftuneError(
            f"{source.path}: loading a single-file checkpoint offline (HF_HUB_OFFLINE is set) needs the "
            f"component configs. {hint}."
        )
    try:
        if denoiser_kwargs:
            sub = {"subfolder": denoiser_name} if source.config_source else {}
            pipe_kwargs[denoiser_name] = denoiser_cls.from_single_file(source.path, **kwargs, **sub,
                                                                       **denoiser_kwargs)
        return pipe_cls.from_single_file(source.path, **kwargs, **pipe_kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SingleFileComponentError) as exc:
        raise DifftuneError(
            f"{source.path}: could not load the single-file checkpoint ({type(exc).__name__}: {exc}). "
            f"{hint}; online, diffusers can fetch the configs itself when model.config is unset."
        ) from None


def tokenize(tokenizer, captions: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    """Token ids padded to ``max_length`` and truncated (long captions lose their tail, as in diffusers)."""
    return tokenizer(
        captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def clip_features(tokenizer, encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, pooled output) of a CLIP text encoder, as SDXL and SD3 condition on."""
    ids = tokenize(tokenizer, captions, tokenizer.model_max_length, module_device(encoder))
    out = encoder(ids, output_hidden_states=True)
    # out[0] is text_embeds for CLIPTextModelWithProjection and last_hidden_state otherwise;
    # callers that need the pooled vector use encoders with a projection.
    return out.hidden_states[-2], out[0]


def t5_features(tokenizer, encoder, captions: list[str], max_length: int) -> torch.Tensor:
    """Last hidden states of a T5 encoder for ``captions``, padded to ``max_length`` tokens."""
    length = min(max_length, int(tokenizer.model_max_length))
    return encoder(tokenize(tokenizer, captions, length, module_device(encoder)))[0]


def flow_match_settings(scheduler, patch_size: int) -> dict[str, Any]:
    """What the ``flow_match`` objective reads from a ``FlowMatchEulerDiscreteScheduler`` config."""
    cfg = scheduler.config
    dynamic = None
    if cfg.get("use_dynamic_shifting"):
        dynamic = {"base_seq_len": cfg.base_image_seq_len, "max_seq_len": cfg.max_image_seq_len,
                   "base_shift": cfg.base_shift, "max_shift": cfg.max_shift}
    return {"num_train_timesteps": int(cfg.num_train_timesteps), "shift": float(cfg.get("shift", 1.0)),
            "dynamic_shift": dynamic, "patch_size": patch_size}


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel / compile wrapper (for reading its config)."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


@dataclass(frozen=True)
class ModelParts:
    """What a family's model is made of, for :func:`load_components`.

    ``encoders`` lists (text-encoder class, tokenizer class) for ``text_encoder``,
    ``text_encoder_2``, ...; ``vae_dtype`` keeps the model's own VAE in a fixed dtype (SDXL: fp32).
    """

    denoiser: type
    scheduler: type
    encoders: tuple[tuple[type, type], ...]
    vae_dtype: torch.dtype | None = None
    single_file_kwargs: dict[str, Any] = field(default_factory=dict)


def load_components(family, parts: ModelParts, source: ModelSource, dtype: torch.dtype, which: str = "all"):
    """Load the components of ``family`` from a diffusers folder, Hub id or single file.

    ``which`` is ``"all"``, ``"frozen"`` (all but the denoiser), ``"denoiser"`` (only the denoiser) or
    ``"meta_denoiser"`` (only the denoiser's structure, on the meta device); a single file loads whole.
    With quantisation the frozen parts are read, cast and quantised one tensor at a time
    (:mod:`difftune.models.streaming`); a single file is converted whole first, then quantised.
    """
    from difftune.models.base import Components
    from difftune.models.quantize import backend_for, quantize_in_place

    # Checked first, so a machine that cannot quantise fails before any weights load.
    denoiser_mode = family.model.quantize
    encoder_mode = family.model.quantize_text_encoders
    denoiser_q = quantized_load(denoiser_mode, "model.quantize", dtype)
    encoder_q = quantized_load(encoder_mode, "model.quantize_text_encoders", dtype, for_transformers=True)
    user_vae = family.model.vae
    vae_dtype = parts.vae_dtype or dtype
    names = ["text_encoder" + (f"_{i + 1}" if i else "") for i in range(len(parts.encoders))]
    tokenizer_names = [n.replace("text_encoder", "tokenizer") for n in names]
    if which == "meta_denoiser" and source.kind != "single_file":
        return _meta_denoiser(family, parts.denoiser, source, dtype, names)
    if source.kind == "single_file":
        pipe = pipeline_from_single_file(
            family.pipeline_class(), source, dtype, denoiser_name=family.denoiser_name, denoiser_cls=parts.denoiser,
            denoiser_kwargs=denoiser_q[1], **parts.single_file_kwargs,
        )
        denoiser = getattr(pipe, family.denoiser_name)
        encoders = [getattr(pipe, n) for n in names]
        tokenizers = [getattr(pipe, n) for n in tokenizer_names]
        vae = load_vae(user_vae, source, dtype, dtype) if user_vae else pipe.vae.to(vae_dtype)
        scheduler = parts.scheduler.from_config(pipe.scheduler.config)
        if denoiser_q[0] is not None and not denoiser_q[1]:
            quantize_in_place(denoiser, denoiser_mode, denoiser_q[0])
        if encoder_q[0] is not None:
            # bitsandbytes quantises only while loading from a folder: here torchao / quanto do it after.
            backend = backend_for(encoder_mode, "model.quantize_text_encoders", cuda=False)
            for encoder in encoders:
                quantize_in_place(encoder, encoder_mode, backend)
    else:
        # The denoiser first: converting its file to the weight dtype holds the file and the converted
        # copy at once, and that peak is lowest while nothing else is loaded yet.
        denoiser = None
        if which != "frozen":
            denoiser = load_part(parts.denoiser, source, family.denoiser_name, dtype, denoiser_mode, denoiser_q)
        if which == "denoiser":
            return Components(denoiser=denoiser, vae=None, text_encoders=[None] * len(names),
                              tokenizers=[None] * len(names), noise_scheduler=None, source=source, encoder_names=names)
        tokenizers = [load_subfolder(tok, source, n) for (_, tok), n in zip(parts.encoders, tokenizer_names,
                                                                            strict=True)]
        encoders = [load_part(enc, source, n, dtype, encoder_mode, encoder_q)
                    for (enc, _), n in zip(parts.encoders, names, strict=True)]
        vae = load_vae(user_vae, source, dtype, vae_dtype)
        scheduler = load_subfolder(parts.scheduler, source, "scheduler")
    config = None
    if denoiser is None:  # what encoding may need to know of it (Flux: the T5 length), from its config
        config = dict(_read_denoiser_config(family, parts.denoiser, source))
    return Components(denoiser=denoiser, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                      noise_scheduler=scheduler, source=source, encoder_names=names, denoiser_config=config)


def _meta_denoiser(family, cls: Any, source: ModelSource, dtype: torch.dtype, names: list[str]):
    """Components holding only the denoiser, built from its config on the meta device (no memory): a
    sharded run's other processes receive their shards of its weights from the main process."""
    from difftune.models.base import Components

    config = _read_denoiser_config(family, cls, source)
    with torch.device("meta"):
        denoiser = cls.from_config(config).to(dtype)
    return Components(denoiser=denoiser, vae=None, text_encoders=[None] * len(names), tokenizers=[None] * len(names),
                      noise_scheduler=None, source=source, encoder_names=names)


def _read_denoiser_config(family, cls: Any, source: ModelSource) -> Any:
    """The denoiser's config file, read from the model folder or Hub id (no weights)."""
    return cls.load_config(source.path, subfolder=family.denoiser_name,
                           **({"revision": source.revision} if source.revision else {}))


def denoiser_config(components) -> Any:
    """The denoiser's config, also while only the frozen parts are loaded (see ``load_components``)."""
    if components.denoiser is not None:
        return unwrap(components.denoiser).config
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(components.denoiser_config)
