"""``difftune push``: upload a finished run (adapter, embeddings, model card, samples) to the Hub.

Only what :func:`files_to_push` lists is uploaded (``upload_folder`` with ``allow_patterns``):
never checkpoints, logs or the config with its local paths. The card's ``base_model`` must be
a Hub id so the Hub links the adapter to its base model.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from difftune.adapters.safe_load import read_header
from difftune.adapters.tools import EMBEDDINGS_FOLDER
from difftune.errors import DifftuneError

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

_MODEL_FOLDER_SUFFIXES = (".safetensors", ".json", ".txt", ".model")


def files_to_push(run_dir: str | Path) -> list[str]:
    """Relative paths (POSIX) of everything ``push`` would upload from ``run_dir``."""
    root = Path(run_dir)
    if not root.is_dir():
        raise DifftuneError(f"{root}: not a run folder")
    if not (root / "README.md").is_file():
        raise DifftuneError(f"{root}: no README.md model card (is this a finished difftune run folder?)")
    files = {"README.md"}
    files |= {p.name for p in root.glob("*.safetensors")}
    # the embeddings for ComfyUI / A1111 / Forge, which the model card names
    files |= {p.relative_to(root).as_posix() for p in (root / EMBEDDINGS_FOLDER).glob("*.safetensors")}
    if (root / "model_index.json").is_file():  # a full fine-tune saved as a diffusers folder
        files.add("model_index.json")
        for sub in root.iterdir():
            if sub.is_dir() and ((sub / "config.json").is_file() or (sub / "tokenizer_config.json").is_file()):
                files |= {p.relative_to(root).as_posix() for p in sub.rglob("*") if p.suffix in _MODEL_FOLDER_SUFFIXES}
    files |= _card_images(root)
    if not any(f.endswith(".safetensors") for f in files):
        raise DifftuneError(f"{root}: no .safetensors adapter, embedding or model to upload")
    for f in files:  # never publish a truncated or corrupted weight file
        if f.endswith(".safetensors"):
            read_header(root / f)
    return sorted(files)


def _card_images(root: Path) -> set[str]:
    """Images the model card shows (markdown links and widget urls) that exist in the run folder."""
    text = (root / "README.md").read_text(encoding="utf-8")
    refs = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'url:\s*"?([^"\n]+)"?', text)
    out = set()
    for ref in refs:
        p = (root / ref).resolve()
        if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file() and root.resolve() in p.parents:
            out.add(p.relative_to(root.resolve()).as_posix())
    return out


def card_base_model(run_dir: Path, override: str | None = None):
    """The parsed model card with a Hub ``base_model`` (``override`` replaces a local path)."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    card = ModelCard.load(run_dir / "README.md")
    if override:
        card.data.base_model = override
    base = card.data.base_model
    if not base:
        raise DifftuneError(f"{run_dir}/README.md: the model card has no base_model; pass --base-model OWNER/NAME")
    try:
        validate_repo_id(str(base))
        local = Path(str(base)).expanduser().exists() or str(base).startswith((".", "/", "~"))
    except HFValidationError:
        local = True
    if local:
        raise DifftuneError(
            f"model card base_model is {base!r}, not a Hub model id; pass --base-model OWNER/NAME "
            "(the Hub id of the model you trained on)"
        )
    return card


def push(run_dir: str | Path, repo: str, *, base_model: str | None = None, private: bool = False,
         dry_run: bool = False, log=print) -> list[str]:
    root = Path(run_dir)
    files = files_to_push(root)
    card = card_base_model(root, base_model)
    if dry_run:
        log(f"would upload to {repo} (base_model {card.data.base_model}):")
        for f in files:
            log(f"  {f}")
        return files
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise DifftuneError("push: the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1); unset it and log in "
                            "with `hf auth login`, or use --dry-run to list the files")
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        for f in files:
            (stage / f).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(root / f, stage / f)
        (stage / "README.md").unlink()
        card.save(stage / "README.md")
        try:
            url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo, folder_path=stage, allow_patterns=files,
                              commit_message="Upload difftune run", repo_type="model")
        except Exception as exc:  # noqa: BLE001 - network, auth and HTTP errors all mean the same to the user
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DifftuneError(f"push to {repo} failed: {reason} (check the network and `hf auth login`)") from None
    log(f"uploaded {len(files)} files to {url}")
    return files


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
