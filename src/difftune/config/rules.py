"""Cross-field checks of a run config that need nothing but the config (and the paths it names).

Checks that need to know what is registered — the model families, the methods and each method's
own rules — run after these, in :mod:`difftune.run_config`.
"""

from __future__ import annotations

import re
from pathlib import Path

from difftune.config.resolve import parse_colour, resolutions, resolve_datasets
from difftune.config.schema import Config, field_default
from difftune.errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


#: How a config names a base shipped inside the package (``difftune:shapes``; see difftune.bases).
BUILTIN_PREFIX = "difftune:"


def looks_local(text: str) -> bool:
    """True if ``text`` names a local path rather than a Hub id (``owner/name``)."""
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.endswith((".safetensors", ".ckpt", ".bin", ".pt"))
        or not HUB_ID.match(text)
    )


def validate_semantics(config: Config, check_paths: bool = True) -> None:
    """Cross-field checks and path checks. Loads no weights."""
    if not config.model.path:
        raise ConfigError("model.path: required; give a diffusers folder, a .safetensors file or a Hub id")
    if not config.data.path and not config.data.datasets:
        raise ConfigError("data.path: required; give an image folder or a dataset (or data.datasets)")
    for i, spec in enumerate(config.data.datasets):
        if not spec.path:
            raise ConfigError(f"data.datasets[{i}].path: required; give an image folder or a dataset")
    if check_paths:
        check_paths_exist(config)
    check_data_options(config)
    if config.data.caption_source == "instance_prompt" and not config.data.instance_prompt:
        raise ConfigError('data.instance_prompt: required when data.caption_source = "instance_prompt"')
    if config.model.dtype == "fp16" and config.train.mixed_precision == "bf16":
        raise ConfigError("model.dtype: fp16 weights with bf16 mixed precision; use model.dtype = \"bf16\"")
    check_prior_preservation(config, check_paths)
    check_holdout(config, check_paths)
    check_samples(config)
    check_memory_options(config)
    check_dependent_keys(config)
    check_distributed(config)
    max_steps = config.train.max_steps
    if max_steps is not None and config.train.warmup_steps > max_steps:
        raise ConfigError(
            f"train.warmup_steps: {config.train.warmup_steps} is more than train.max_steps ({max_steps})"
        )


def check_memory_options(config: Config) -> None:
    """Offloading needs gradient checkpointing; trained text encoders cannot be quantised; DoRA needs an
    8-bit (or unquantised) base."""
    m = config.model
    if m.offload != "none" and not config.train.gradient_checkpointing:
        raise ConfigError(f'model.offload: "{m.offload}" needs train.gradient_checkpointing = true (without it '
                          "every block's weights are kept for the backward pass, so nothing would be offloaded)")
    if m.quantize in ("int4", "nf4") and config.method.variant == "dora":
        raise ConfigError(f'model.quantize: "{m.quantize}" with method.variant = "dora"; DoRA reads the base weight '
                          "to scale its update, and peft cannot dequantise 4-bit weights for it. Use "
                          'model.quantize = "int8" or "fp8" with DoRA, or another variant on a 4-bit base')
    if m.quantize_text_encoders != "none" and config.method.train_text_encoder:
        raise ConfigError(f'model.quantize_text_encoders: "{m.quantize_text_encoders}" with '
                          "method.train_text_encoder; trained encoders cannot be quantised. Set one of them off")


def check_paths_exist(config: Config) -> None:
    """Local paths the config names must exist (Hub ids are left to the loaders)."""
    named = [("model.path", config.model.path), ("data.path", config.data.path)]
    named += [(f"data.datasets[{i}].path", d.path) for i, d in enumerate(config.data.datasets)]
    for key, value in named:
        if key == "model.path" and value.startswith(BUILTIN_PREFIX):
            continue  # a base shipped inside difftune: checked by difftune.load_config (run_config)
        if value and not Path(value).expanduser().exists() and looks_local(value):
            raise ConfigError(f"{key}: {value} does not exist")
        if key != "model.path" and value and Path(value).expanduser().is_file():
            raise ConfigError(f"{key}: {value} is a file; give a folder of images (or a dataset folder or Hub id)")
    out = Path(config.output.dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir: {out} is a file, not a folder; choose a folder for the run's results")
    check_model_path(config.model.path)
    vae = config.model.vae
    if vae and not Path(vae).expanduser().exists():
        raise ConfigError(f"model.vae: {vae} does not exist; give a VAE folder or a .safetensors file")
    resume = config.train.resume
    if resume and resume != "latest" and not Path(resume).expanduser().is_dir():
        raise ConfigError(f"train.resume: {resume} is not a checkpoint folder (or use \"latest\")")
    if resume and resume != "latest" and (Path(resume).expanduser() / "checkpoints").is_dir():
        raise ConfigError(f"train.resume: {resume} is a run folder, not a checkpoint; give one of its checkpoints "
                          f"({Path(resume) / 'checkpoints' / 'step-N'}), or set output.dir to it and "
                          "train.resume = \"latest\"")


def check_model_path(value: str) -> None:
    """A local ``model.path`` must look like a model: a folder with ``model_index.json`` or a
    ``.safetensors`` file with a readable header (read without loading any weights)."""
    path = Path(value).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise ConfigError(f"model.path: {value} is a folder without model_index.json, not a diffusers model "
                          "(is it a dataset?); give the folder that holds model_index.json or a .safetensors file")
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ConfigError(f"model.path: {value} is not a .safetensors checkpoint (pickle checkpoints can run "
                              "code when loaded; convert it to .safetensors first)")
        if not _safetensors_header_ok(path):
            raise ConfigError(f"model.path: {value} is not a safetensors file (its header cannot be read)")


def _safetensors_header_ok(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= min(100_000_000, path.stat().st_size - 8):
                return False
            return f.read(1) == b"{"
    except OSError:
        return False


def check_data_options(config: Config) -> None:
    """Cross-field checks of ``[data]``."""
    data = config.data
    try:
        parse_colour(data.background)
    except ValueError:
        raise ConfigError(f"data.background: {data.background!r} is not a colour; use a name such as "
                          "\"white\" or \"#808080\"") from None
    sizes = resolutions(data)
    if not sizes or len(set(sizes)) != len(sizes) or any(not 8 <= r <= 8192 for r in sizes):
        raise ConfigError(f"data.resolution: {data.resolution!r} must be one size or a list of different sizes, "
                          "each 8 to 8192, e.g. 512 or [512, 768]")
    odd = [r for r in sizes if r % 8]
    if odd:
        raise ConfigError(f"data.resolution: {odd[0]} is not a multiple of 8 (the VAE works in blocks of 8 "
                          f"pixels), e.g. {max(8, odd[0] // 8 * 8)}")
    if data.buckets and data.bucket_step % 8:
        raise ConfigError(f"data.bucket_step: {data.bucket_step} is not a multiple of 8, e.g. 64")
    if data.buckets and data.bucket_step > min(sizes):
        raise ConfigError(f"data.bucket_step: {data.bucket_step} is larger than data.resolution "
                          f"({min(sizes)}); use a step of at most the resolution, e.g. 64")
    if data.cache_text and config.method.train_text_encoder:
        raise ConfigError("data.cache_text: the text encoder is trained (method.train_text_encoder), so its "
                          "embeddings change every step and cannot be cached; turn one of them off")
    if data.cache_text and data.shuffle_tags:
        raise ConfigError("data.cache_text: data.shuffle_tags makes a new caption every epoch, which cannot be "
                          "cached; turn one of them off")
    for spec in resolve_datasets(data):
        if spec.caption_source == "instance_prompt" and not spec.instance_prompt:
            raise ConfigError(f'{spec.key(data)}.instance_prompt: required when caption_source = "instance_prompt"')


def check_prior_preservation(config: Config, check_paths: bool) -> None:
    """``[prior_preservation]`` is complete (whether the method uses it is the method's rule)."""
    prior = config.prior_preservation
    if prior.class_prompt and prior.instance_word:
        raise ConfigError("prior_preservation.instance_word: set either class_prompt (one prompt for every class "
                          "image) or instance_word (class prompts from the captions without that word), not both")
    if prior.instance_word is not None and not prior.instance_word.strip():
        raise ConfigError("prior_preservation.instance_word: empty; give the word that marks the subject in the "
                          "captions (e.g. \"sks\")")
    if prior.enabled:
        key = "class_prompt" if prior.class_prompt else "instance_word"
        if not prior.class_data:
            raise ConfigError(f"prior_preservation.class_data: required with {key} (a folder for class images)")
        if check_paths and Path(prior.class_data).expanduser().is_file():
            raise ConfigError(f"prior_preservation.class_data: {prior.class_data} is a file, not a folder")
    elif prior.class_data:
        raise ConfigError("prior_preservation.class_prompt: required when class_data is set (or instance_word, "
                          "to draw the class images from the captions)")


def check_samples(config: Config) -> None:
    """Every ``validation.samples`` entry has a prompt; sizes are multiples of 8 (what the VAE needs)."""
    size = config.validation.resolution
    if size is not None and size % 8:
        raise ConfigError(f"validation.resolution: {size} is not a multiple of 8")
    for i, spec in enumerate(config.validation.samples):
        if not spec.prompt.strip():
            raise ConfigError(f"validation.samples[{i}].prompt: required, e.g. {{prompt = \"a photo of sks dog\"}}")
        for key in ("width", "height"):
            value = getattr(spec, key)
            if value is not None and value % 8:
                raise ConfigError(f"validation.samples[{i}].{key}: {value} is not a multiple of 8")
        if len(set(spec.seeds)) != len(spec.seeds):
            raise ConfigError(f"validation.samples[{i}].seeds: {spec.seeds} repeats a seed")


def check_holdout(config: Config, check_paths: bool) -> None:
    val = config.validation
    if isinstance(val.holdout, float) and not 0.0 < val.holdout < 1.0:
        raise ConfigError(f"validation.holdout: {val.holdout!r} must be a fraction between 0 and 1, or a folder")
    if isinstance(val.holdout, str) and check_paths and not Path(val.holdout).expanduser().is_dir():
        raise ConfigError(f"validation.holdout: {val.holdout} is not a folder (give a fraction such as 0.1, or a folder)")
    if val.holdout is None:
        for key in ("loss_every", "patience", "holdout_word"):
            if getattr(val, key):
                raise ConfigError(f"validation.{key}: needs validation.holdout (a fraction such as 0.1, or a folder)")
    if val.holdout_word and not val.holdout_word.strip():
        raise ConfigError("validation.holdout_word: empty; give the word of the captions that names what the run "
                          "teaches (e.g. \"sks\"), or leave it out")


def _is_default(section, key: str) -> bool:
    f = type(section).__dataclass_fields__[key]
    default = field_default(f)
    return getattr(section, key) == default


def check_dependent_keys(config: Config) -> None:
    """A key that only matters with another setting is refused without it (it would do nothing)."""
    t, d = config.train, config.data
    huber = 'train.loss = "huber" or "smooth_l1"'
    rules = (
        (t, "train.huber_delta", huber, t.loss in ("huber", "smooth_l1")),
        (t, "train.huber_schedule", huber, t.loss in ("huber", "smooth_l1")),
        (t, "train.timestep_bias_multiplier", 'train.timestep_bias = "earlier" or "later"', t.timestep_bias != "none"),
        (t, "train.timestep_bias_portion", 'train.timestep_bias = "earlier" or "later"', t.timestep_bias != "none"),
        (t, "train.logit_mean", 'train.weighting_scheme = "logit_normal"', t.weighting_scheme == "logit_normal"),
        (t, "train.logit_std", 'train.weighting_scheme = "logit_normal"', t.weighting_scheme == "logit_normal"),
        (t, "train.mode_scale", 'train.weighting_scheme = "mode"', t.weighting_scheme == "mode"),
        (t, "train.lr_cycles", 'train.lr_scheduler = "cosine_with_restarts"', t.lr_scheduler == "cosine_with_restarts"),
        (t, "train.lr_power", 'train.lr_scheduler = "polynomial"', t.lr_scheduler == "polynomial"),
        (t, "train.compile_mode", "train.compile = true", t.compile),
        (d, "data.bucket_step", "data.buckets = true", d.buckets),
        (d, "data.keep_tags", "data.shuffle_tags = true", d.shuffle_tags),
        (t, "train.fsdp_cpu_offload", 'train.distributed = "fsdp"', t.distributed == "fsdp"),
    )
    for section, key, needs, applies in rules:
        if not applies and not _is_default(section, key.split(".", 1)[1]):
            raise ConfigError(f"{key}: only applies with {needs}; set that, or remove {key}")
    if t.timestep_max is not None and t.timestep_max < t.timestep_min:
        raise ConfigError(f"train.timestep_max: {t.timestep_max} is below train.timestep_min ({t.timestep_min})")
    if t.optimizer == "adamw_schedulefree" and t.lr_scheduler != "constant":
        raise ConfigError(f"train.lr_scheduler: {t.lr_scheduler!r} with schedule-free AdamW, which replaces the "
                          "schedule; use \"constant\" (train.warmup_steps is its warm-up)")


#: The methods whose trained modules ``train.distributed = "fsdp"`` shards.
FSDP_METHODS = ("full", "lora")


def check_distributed(config: Config) -> None:
    """``train.distributed = "fsdp"``: what it shards, and what it cannot do yet."""
    t = config.train
    if t.distributed != "fsdp":
        return
    if config.method.type not in FSDP_METHODS:
        raise ConfigError(f'train.distributed: "fsdp" shards the methods {", ".join(FSDP_METHODS)}, not '
                          f'{config.method.type!r}; use train.distributed = "ddp"')
