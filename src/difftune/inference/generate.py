"""``difftune generate``: images from a base model plus any number of weighted adapters and embeddings."""

from __future__ import annotations

import json
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
    if not s.prompts:
        raise DifftuneError("--prompt: give at least one prompt")
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
            path = s.out / f"{i:02d}-{j:02d}-seed{seed}.png"
            image.save(path)
            images.append(image)
            paths.append(path)
    make_grid(images, cols=s.images_per_prompt).save(s.out / "grid.png")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in s.__dict__.items()}
    settings["trained_sampling"] = sampling
    (s.out / "generate.json").write_text(json.dumps(settings, indent=2))
    log(f"wrote {len(paths)} image(s) and grid.png to {s.out}")
    return paths

