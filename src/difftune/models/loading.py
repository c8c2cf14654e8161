"""Resolve ``model.path`` to a :class:`ModelSource` and tell what a single-file checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path

from difftune.bases import resolve as resolve_builtin
from difftune.errors import DifftuneError
from difftune.models.base import ModelSource

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".sft")


def resolve_source(path: str, revision: str | None = None, variant: str | None = None,
                   config_source: str | None = None) -> ModelSource:
    """Classify ``path`` as a diffusers folder, a single file or a Hub id (no weights are read).

    A built-in name (``difftune:shapes``) stands for its folder inside the package.
    """
    p = Path(resolve_builtin(path)).expanduser()
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            raise DifftuneError(
                f"{p}: not a diffusers model folder (no model_index.json). Point model.path at the "
                "folder that holds model_index.json, or at a single .safetensors checkpoint."
            )
        try:
            cls_name = json.loads(index.read_text()).get("_class_name")
        except json.JSONDecodeError as exc:
            raise DifftuneError(f"{index}: not valid JSON ({exc})") from None
        return ModelSource(str(p), "folder", revision, variant, cls_name)
    if p.is_file():
        if p.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise DifftuneError(f"{p}: not a model checkpoint (expected .safetensors)")
        if p.suffix.lower() != ".safetensors":
            raise DifftuneError(
                f"{p}: pickle checkpoints can run code when loaded; convert it to .safetensors first"
            )
        return ModelSource(str(p), "single_file", revision, variant, None, config_source)
    return ModelSource(path, "hub", revision, variant, _hub_pipeline_class(path, revision))


def _hub_pipeline_class(repo_id: str, revision: str | None) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        index = hf_hub_download(repo_id, "model_index.json", revision=revision)
    except (LocalEntryNotFoundError, OSError, HfHubHTTPError) as exc:
        raise DifftuneError(
            f"model.path: {repo_id} is not a local path and could not be fetched from the Hugging Face "
            f"Hub ({type(exc).__name__}). Check the id, your network, or download the model to a folder."
        ) from None
    return json.loads(Path(index).read_text()).get("_class_name")


def single_file_type(source: ModelSource) -> str | None:
    """diffusers' guess of a single-file checkpoint's model type, read from its tensor names."""
    if source.kind != "single_file":
        return None
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors import safe_open

    try:
        with safe_open(source.path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise DifftuneError(f"{source.path}: not a readable safetensors file ({exc})") from None
    # infer_diffusers_model_type only looks at key names and a few shapes; give it lazy tensors.
    try:
        model_type = infer_diffusers_model_type(_LazyCheckpoint(source.path, keys))
    except Exception:  # noqa: BLE001 - an unexpected layout; detect_family asks for model.family
        return None
    # diffusers tells SD 2.x by its 1024-wide cross-attention, so a small SD 2.x-layout model reads
    # as v1; its OpenCLIP text encoder (SD 1.x uses OpenAI CLIP) settles it.
    if model_type == "v1" and OPEN_CLIP_TEXT_KEY in keys:
        return "v2"
    # diffusers answers v1 for any file it does not recognise (a LoRA, a bare VAE, ...).
    if model_type == "v1" and not any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        return None
    return model_type


#: A tensor only SD 2.x single files have: the OpenCLIP text encoder's token embedding.
OPEN_CLIP_TEXT_KEY = "cond_stage_model.model.token_embedding.weight"
LDM_UNET_PREFIX = "model.diffusion_model."


class _LazyCheckpoint(dict):
    """A mapping of tensor names that reads a tensor only when it is looked at."""

    def __init__(self, path: str, keys: list[str]) -> None:
        super().__init__((k, None) for k in keys)
        self._path = path

    def __getitem__(self, key):
        from safetensors import safe_open

        with safe_open(self._path, framework="pt", device="cpu") as f:
            return f.get_tensor(key)
