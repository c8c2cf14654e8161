"""``difftune generate``: images from a base model plus any number of weighted adapters and embeddings."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftune.adapters.safe_load import load_tensors, require_finite, resolve_weight_file
from difftune.errors import DifftuneError
from difftune.inference.apply import load_adapters
from difftune.inference.images import make_grid
from difftune.inference.sampling import apply_sampling, sample_image, trained_sampling
from difftune.inference.schedulers import SCHEDULERS
from difftune.models import load_pipeline


@dataclass
class GenerateSettings:
    model: str
    prompts: list[str]
    out: Path
    loras: list[tuple[str, float]] = field(default_factory=list)
    embeddings: list[tuple[str, str | None]] = field(default_factory=list)
    negative_prompt: str | None = None
    steps: int = 25
    guidance: float = 7.0
    seed: int = 0
    images_per_prompt: int = 1
    width: int | None = None
    height: int | None = None
    scheduler: str = "dpm++"
    family: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    overwrite: bool = False

    def image_path(self, prompt_index: int, image_index: int) -> Path:
        return self.out / f"{prompt_index:02d}-{image_index:02d}-seed{self.seed + image_index}.png"

    def files(self) -> list[Path]:
        """Every file a run of these settings writes into ``out``."""
        images = [self.image_path(i, j) for i in range(len(self.prompts)) for j in range(self.images_per_prompt)]
        return [*images, self.out / "grid.png", self.out / "generate.json"]


def check_settings(s: GenerateSettings) -> None:
    """Numbers the pipeline would fail on (with a traceback) or quietly misuse, refused with one line."""
    if not s.prompts:
        raise DifftuneError("--prompt: give at least one prompt")
    if s.steps < 1:
        raise DifftuneError(f"--steps: {s.steps}; give at least 1 sampling step, e.g. 25")
    if s.images_per_prompt < 1:
        raise DifftuneError(f"--num-images: {s.images_per_prompt}; give at least 1 image per prompt")
    if not math.isfinite(s.guidance) or s.guidance < 0:
        raise DifftuneError(f"--guidance: {s.guidance}; give a finite number >= 0, e.g. 7")
    for flag, size in (("--width", s.width), ("--height", s.height)):
        if size is not None and (size < 8 or size % 8):
            raise DifftuneError(f"{flag}: {size} is not a positive multiple of 8 (the VAE works in blocks of 8 "
                                "pixels), e.g. 512")


def check_out(s: GenerateSettings) -> None:
    """``--out`` must be a folder, and files of the same names are replaced only with ``--overwrite``."""
    if s.out.exists() and not s.out.is_dir():
        raise DifftuneError(f"--out {s.out}: is a file, not a folder; choose a folder for the images")
    existing = [p.name for p in s.files() if p.exists()]
    if existing and not s.overwrite:
        raise DifftuneError(f"--out {s.out}: already holds {', '.join(existing[:3])}"
                            f"{f' and {len(existing) - 3} more' if len(existing) > 3 else ''}; give --overwrite to "
                            "replace them, or choose another folder")


def set_scheduler(pipe, choice: str) -> None:
    import diffusers

    if choice not in SCHEDULERS:
        raise DifftuneError(f"--scheduler: unknown {choice!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[choice])
    if type(pipe.scheduler) is not cls:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)


def load_embedding(pipe, path: str, token: str | None, *, allow_pickle: bool = False, log=print) -> str:
    """Load a textual-inversion file (diffusers ``emb_params``, A1111, or SDXL ``clip_l``/``clip_g``)."""
    file = resolve_weight_file(path)
    tensors, meta = load_tensors(file, allow_pickle=allow_pickle)
    require_finite(tensors, str(file))
    if not hasattr(pipe, "load_textual_inversion"):
        raise DifftuneError(f"{file}: this model's pipeline cannot load textual-inversion embeddings")
    token = token or meta.get("difftune.token") or f"<{file.stem}>"
    try:
        if "clip_l" in tensors:
            pipe.load_textual_inversion(tensors["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            if "clip_g" in tensors and getattr(pipe, "text_encoder_2", None) is not None:
                pipe.load_textual_inversion(tensors["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                            tokenizer=pipe.tokenizer_2)
        else:
            vectors = _embedding_vectors(file, tensors)
            pipe.load_textual_inversion({token: vectors}, token=token)
    except ValueError as exc:
        raise DifftuneError(f"{file}: could not load the embedding ({str(exc).splitlines()[0]})") from None
    log(f"loaded embedding {file} as {token}")
    return token


def _embedding_vectors(file: Path, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if "emb_params" in tensors:
        return tensors["emb_params"]
    params = [v for k, v in tensors.items() if k.startswith("string_to_param")]
    if len(params) == 1:
        return params[0]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise DifftuneError(f"{file}: not a textual-inversion embedding (keys: {', '.join(sorted(tensors)[:5])})")


def generate(s: GenerateSettings, log=print) -> list[Path]:
    """Write one PNG per (prompt, image) and ``grid.png`` into ``s.out``; return the image paths."""
    check_settings(s)
    check_out(s)  # before anything loads
    cuda = torch.cuda.is_available()
    dtype = {"auto": torch.float16 if cuda else torch.float32, "fp32": torch.float32,
             "fp16": torch.float16, "bf16": torch.bfloat16}[s.dtype]
    for path in [p for p, _ in s.loras] + [p for p, _ in s.embeddings]:  # before the base model loads
        require_finite(load_tensors(path, allow_pickle=s.allow_pickle)[0], str(path))
    pipe, family, components = load_pipeline(s.model, s.family, dtype)
    load_adapters(pipe, s.loras, family=family, components=components, allow_pickle=s.allow_pickle, log=log)
    for path, token in s.embeddings:
        load_embedding(pipe, path, token, allow_pickle=s.allow_pickle, log=log)
    set_scheduler(pipe, s.scheduler)
    sampling = trained_sampling([path for path, _ in s.loras])
    extra = apply_sampling(pipe, sampling)
    if sampling:
        log(f"the LoRA asks for these sampler settings (it was trained with them): {sampling}")
    pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    s.out.mkdir(parents=True, exist_ok=True)
    images, paths = [], []
    for i, prompt in enumerate(s.prompts):
        for j in range(s.images_per_prompt):
            seed = s.seed + j
            image = sample_image(pipe, prompt, steps=s.steps, guidance=s.guidance, seed=seed,
                                 negative_prompt=s.negative_prompt, width=s.width, height=s.height, extra=extra)
            path = s.image_path(i, j)
            image.save(path)
            images.append(image)
            paths.append(path)
    make_grid(images, cols=s.images_per_prompt).save(s.out / "grid.png")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in s.__dict__.items()}
    settings["trained_sampling"] = sampling
    (s.out / "generate.json").write_text(json.dumps(settings, indent=2))
    log(f"wrote {len(paths)} image(s) and grid.png to {s.out}")
    return paths

