"""The config schema. Each dataclass field carries its own documentation, choices and bounds.

The reference in the README and ``difftune init`` are generated from these definitions, so
they cannot drift from what the validator accepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 1


def field_default(f: dataclasses.Field):
    """A config field's default value (its factory's result for list and table keys)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def opt(
    default: Any,
    doc: str,
    *,
    choices: tuple[str, ...] | None = None,
    registry: str | None = None,
    min: float | None = None,  # noqa: A002 - reads naturally at the call site
    max: float | None = None,  # noqa: A002
    path: str | None = None,
    min_exclusive: bool = False,
) -> Any:
    """Declare a config field with its documentation and constraints.

    ``path`` is ``"file"``, ``"dir"``, ``"any"`` (must exist) or ``"model"`` / ``"data"`` (a local
    path that must exist, or a Hub id) for fields naming something on disk. ``registry`` names the
    registry (``"families"``, ``"methods"``) whose names the value may also be; they are checked
    against the registries' names, which this package never imports (:mod:`difftune.run_config`).
    """
    meta = {"doc": doc, "choices": choices, "registry": registry, "min": min, "max": max, "path": path,
            "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """The base model to fine-tune."""

    path: str = opt(
        "",
        "Base model: a diffusers folder (with `model_index.json`), a single-file `.safetensors` "
        "checkpoint, a Hugging Face Hub id such as `stable-diffusion-v1-5/stable-diffusion-v1-5`, or "
        "`difftune:shapes`, the small SD 1.x base shipped inside difftune (docs/world.md).",
        path="model",
    )
    family: str = opt(
        "auto",
        "Model family. `auto` detects it from the model's files; set it to override detection.",
        choices=("auto",),
        registry="families",
    )
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) when `path` is a Hub id.")
    variant: str | None = opt(None, "Weight variant to load, e.g. `fp16` for `*.fp16.safetensors` files.")
    config: str | None = opt(
        None,
        "For a single-file checkpoint: a diffusers folder or Hub id holding the component configs "
        "(needed offline; online, diffusers finds them from the checkpoint).",
    )
    dtype: str = opt(
        "auto",
        "Dtype of the frozen weights. `auto` follows `train.mixed_precision` (bf16/fp16 weights when "
        "mixed precision is on, fp32 otherwise). Trainable parameters always stay in fp32.",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    vae: str | None = opt(
        None,
        "Replacement VAE: a diffusers `AutoencoderKL` folder or a single `.safetensors` file (e.g. an "
        "fp16-safe SDXL VAE). It is loaded in the frozen-weight dtype; without it, families whose VAE "
        "overflows in fp16 (SDXL) keep their own VAE in fp32.",
        path="any",
    )
    quantize: str = opt(
        "none",
        "Quantise the frozen denoiser's linear layers to save memory (QLoRA-style; LoRA layers and "
        "the exported adapter stay full precision): `int8` or `fp8` (weight-only, torchao), `int4` "
        "(group-wise, optimum-quanto) or `nf4` (QLoRA's 4-bit NormalFloat, torchao), on any device "
        "(extra `difftune[quantize]`); on a CUDA GPU with bitsandbytes installed, `int8` and `nf4` use "
        "bitsandbytes. Weights are read and quantised one tensor at a time (docs/memory.md). `none` "
        "keeps the weights as loaded.",
        choices=("none", "int8", "fp8", "int4", "nf4"),
    )
    quantize_text_encoders: str = opt(
        "none",
        "Quantise the frozen text encoders' linear layers, as `quantize` does the denoiser's (same "
        "modes and libraries). Not with `method.train_text_encoder`.",
        choices=("none", "int8", "fp8", "int4", "nf4"),
    )
    offload: str = opt(
        "none",
        "`blocks`: keep the frozen denoiser's block weights in host memory and copy each block to the GPU "
        "only while it runs (forward, recomputation and backward); LoRA weights stay on the GPU. Needs "
        "a CUDA GPU and `train.gradient_checkpointing`; trades speed for GPU memory (docs/memory.md).",
        choices=("none", "blocks"),
    )


@dataclass
class MethodConfig:
    """What is trained."""

    type: str = opt("lora", "Fine-tuning method.", registry="methods")
    rank: int = opt(16, "LoRA rank (dimension of the low-rank update).", min=1, max=4096)
    alpha: float | None = opt(
        None, "LoRA alpha; the update is scaled by alpha/rank. Defaults to the rank (scale 1).", min=0
    )
    dropout: float = opt(0.0, "Dropout on the LoRA branch during training.", min=0.0, max=1.0)
    targets: list[str] = opt(
        [],
        "Module names (suffixes) that get LoRA layers in the denoiser. Empty means the family's "
        "default: the attention projections (`to_q`, `to_k`, `to_v`, `to_out.0` for SD). For a style, add the "
        "ResNet convolutions `conv1`, `conv2` (kohya's LoCon; docs/methods.md, \"Styles\").",
    )
    train_text_encoder: bool = opt(
        False, "Also train the text encoder(s): LoRA layers for `lora` and `pivotal`, all weights for `full`."
    )
    text_encoder_targets: list[str] = opt(
        [],
        "Text-encoder modules that get LoRA layers when `train_text_encoder` is on. Empty means "
        "`q_proj`, `k_proj`, `v_proj`, `out_proj`.",
    )
    init: str = opt(
        "default",
        "LoRA initialisation: `default` (B=0, so training starts at the base model) or `gaussian`.",
        choices=("default", "gaussian"),
    )
    variant: str = opt(
        "lora",
        "Low-rank variant for `lora` and `pivotal`: `lora`, `dora` (weight-decomposed LoRA; loads with "
        "`load_lora_weights`), `loha` (Hadamard product; saved in peft's format) or `lokr` (Kronecker "
        "product; loads with `pipe.unet.load_lora_adapter`). See docs/methods.md for which tools load each.",
        choices=("lora", "dora", "loha", "lokr"),
    )
    rank_pattern: dict[str, int] = opt(
        {},
        "Per-module ranks overriding `rank`: module-name pattern → rank, e.g. "
        "`{ \"mid_block.attentions.0.transformer_blocks.0.attn1.to_q\" = 32 }` (peft's `rank_pattern`).",
    )
    alpha_pattern: dict[str, float] = opt(
        {}, "Per-module alphas overriding `alpha`: module-name pattern → alpha (peft's `alpha_pattern`)."
    )
    token: list[str] = opt(
        [],
        "`textual_inversion` / `pivotal`: the new placeholder token(s), e.g. `\"<sks>\"`; a token with "
        "`num_vectors` > 1 also adds `<sks>_1`, `<sks>_2`, ... (diffusers' multi-vector naming).",
    )
    initializer_token: list[str] = opt(
        [],
        "`textual_inversion` / `pivotal`: word(s) whose embedding starts each new token, e.g. `\"dog\"` "
        "(one for all tokens, or one per token). A word of several tokens starts from their mean.",
    )
    num_vectors: int = opt(1, "`textual_inversion` / `pivotal`: embedding vectors per placeholder token.", min=1, max=75)
    templates: str = opt(
        "object",
        "`textual_inversion` / `pivotal`: training prompts. `object` (\"a photo of a <sks>\", ...), `style` "
        "(\"a painting in the style of <sks>\", ...) or `none` (use the data's captions, which must "
        "contain the token).",
        choices=("object", "style", "none"),
    )
    text_learning_rate: float | None = opt(
        None, "`pivotal`: learning rate of the token embeddings; defaults to `train.learning_rate`.", min=0,
        min_exclusive=True,
    )
    embedding_stop_step: int | None = opt(
        None, "`pivotal`: the embeddings stop training after this step (the LoRA continues). Unset: never.",
        min=0,
    )
    ema: bool = opt(
        False,
        "Keep an exponential moving average (EMA) of the trained weights, for every method: the LoRA "
        "matrices for `lora`/`pivotal`, the token embeddings for `textual_inversion`, all trained weights "
        "for `full`. It is saved in checkpoints; `ema_export` and `ema_validate` say where it is used.",
    )
    ema_decay: float = opt(0.9999, "EMA decay per step (with `ema`).", min=0.0, max=1.0)
    ema_export: bool = opt(True, "With `ema`: export the EMA weights (false: the last trained weights).")
    ema_validate: bool = opt(
        True, "With `ema`: sample validation images and compute the held-out loss with the EMA weights.",
    )
    text_encoder_learning_rate: float | None = opt(
        None,
        "`lora`, `pivotal`, `full` with `train_text_encoder`: learning rate of the text encoder(s) (their LoRA "
        "layers, or all their weights for `full`); unset uses `train.learning_rate`.",
        min=0, min_exclusive=True,
    )
    lora_plus_ratio: float | None = opt(
        None,
        "`lora`/`pivotal` with variant `lora` or `dora`: LoRA+ — the B matrices learn this many times faster "
        "than the A matrices (the LoRA+ paper suggests 16). Unset: one learning rate.",
        min=0, min_exclusive=True,
    )
    block_lr: dict[str, float] = opt(
        {},
        "`lora`, `pivotal`, `full`: learning-rate multipliers per denoiser block, e.g. "
        "`{ down = 0.5, mid = 1.0, \"up.3\" = 2.0 }` for UNets (`down`, `mid`, `up`, or one block `down.N`, "
        "`up.N`), `{ \"0-9\" = 0.5, \"single.0-37\" = 1.5 }` for transformers (a range of "
        "`transformer_blocks`, `single.` for Flux's single blocks). The most specific key wins; a key that "
        "matches no trained parameter stops the run before training. 0 freezes a block.",
    )
    save_single_file: bool = opt(
        False,
        "`full`: also write `model.safetensors`, the whole model in the original (LDM) single-file "
        "layout that A1111 and ComfyUI load. Needs a family with a converter (SD 1.x/2.x); others stop "
        "with an error before training.",
    )


@dataclass
class DatasetSpec:
    """One extra dataset in ``data.datasets``: ``{path = "reg", weight = 1.0, repeats = 1, instance_prompt = "a dog"}``."""

    path: str = opt("", "Image folder or dataset, as for `data.path` (required).", path="data")
    weight: float | None = opt(
        None,
        "Share of each epoch drawn from this dataset, relative to the other datasets' weights "
        "(a dataset without a weight counts as 1). When no dataset sets one, each contributes its "
        "images × repeats.",
        min=0,
        min_exclusive=True,
    )
    repeats: int = opt(1, "How many times each image appears per epoch.", min=1, max=10000)
    instance_prompt: str | None = opt(
        None, "Prompt for images of this dataset without a caption (or for all, per `caption_source`)."
    )
    caption_source: str | None = opt(
        None, "As `data.caption_source`, for this dataset; unset uses `data.caption_source`.",
        choices=("auto", "captions", "instance_prompt"),
    )
    trigger: str | None = opt(
        None, "Trigger word for this dataset; unset uses `data.trigger`, `\"\"` turns it off (e.g. "
        "for regularisation images).",
    )


@dataclass
class DataConfig:
    """Training images and their captions."""

    path: str = opt(
        "",
        "Image folder (captions from `metadata.jsonl` or `.txt` files beside the images), a local "
        "dataset saved by `datasets`, or a Hugging Face dataset id.",
        path="data",
    )
    caption_column: str = opt("text", "Caption column in `metadata.jsonl` or the dataset.")
    image_column: str = opt("image", "Image column of a Hugging Face dataset.")
    instance_prompt: str | None = opt(
        None,
        "One prompt for every image (DreamBooth style, e.g. `a photo of sks dog`). Used for "
        "images that have no caption; with `caption_source = \"instance_prompt\"` it replaces all captions.",
    )
    caption_source: str = opt(
        "auto",
        "Where captions come from: `auto` (metadata/.txt captions, else `instance_prompt`), "
        "`captions` (every image must have one) or `instance_prompt` (ignore captions).",
        choices=("auto", "captions", "instance_prompt"),
    )
    caption_extension: str = opt(".txt", "Extension of caption files beside images.")
    resolution: int | list[int] = opt(
        512,
        "Training resolution in pixels (images are resized and cropped to it). A list, e.g. `[512, 768]`, trains "
        "every image at each resolution (each epoch holds every image once per resolution; a batch holds one "
        "size; latents are cached at each); validation samples and class images use the first.",
        min=8, max=8192,
    )
    center_crop: bool = opt(False, "Centre-crop to the resolution; otherwise crop at a random position.")
    random_flip: bool = opt(False, "Flip images horizontally at random (not for subjects with asymmetric text or logos).")
    num_workers: int = opt(0, "Data-loader worker processes (0 loads in the training process).", min=0, max=64)
    repeats: int = opt(1, "How many times each image of `data.path` appears per epoch.", min=1, max=10000)
    datasets: list[DatasetSpec] = opt(
        [],
        "More datasets in the same run, e.g. subject + regularisation images: a list of tables with "
        "keys `path`, `weight`, `repeats`, `instance_prompt`, `caption_source`, `trigger` "
        "(`[[data.datasets]]` or `datasets = [{path = \"reg\", weight = 1.0}]`). `data.path`, if "
        "set, is the first dataset.",
    )
    on_bad_file: str = opt(
        "skip",
        "What to do with files that cannot be used (corrupt, not an image, too small or large, unsafe "
        "metadata path, no caption): `skip` them with the reason logged and counted in the model card, "
        "or stop with the list before training (`error`). `difftune data check` shows them.",
        choices=("skip", "error"),
    )
    min_size: int = opt(16, "Images whose shorter side is below this many pixels are skipped.", min=1)
    max_pixels: int = opt(
        64_000_000,
        "Images with more pixels than this (width × height, read from the header without decoding) "
        "are refused, so a decompression bomb cannot exhaust memory.",
        min=1, max=89_478_485,
    )
    background: str = opt(
        "white",
        "Colour that transparent images (RGBA, LA, palette with transparency) are composited on: "
        "a name or `#rrggbb`.",
    )
    buckets: bool = opt(
        False,
        "Aspect-ratio buckets: each image is resized and cropped to the nearest of a set of sizes of "
        "about `resolution`² pixels (sides multiples of `bucket_step`); a batch holds one bucket.",
    )
    bucket_step: int = opt(64, "Side lengths of buckets are multiples of this many pixels.", min=8, max=1024)
    caption_dropout: float = opt(
        0.0, "Probability of training on the empty prompt instead of the caption (helps guidance).",
        min=0.0, max=1.0,
    )
    shuffle_tags: bool = opt(
        False, "Shuffle the comma-separated tags of each caption every epoch (the first `keep_tags` stay).",
    )
    keep_tags: int = opt(0, "Number of leading tags that `shuffle_tags` leaves in place.", min=0)
    trigger: str | None = opt(None, "Trigger word added to every caption (see `trigger_position`).")
    trigger_position: str = opt(
        "prefix", "Where the trigger goes: `prefix` (`sks, a dog`) or `suffix` (`a dog, sks`).",
        choices=("prefix", "suffix"),
    )
    cache_latents: bool = opt(
        False,
        "Encode each image once with the VAE (and its flip when `random_flip` is on) and reuse the "
        "latent distribution from disk; the crop becomes a fixed centre crop. Noise is still sampled "
        "at train time.",
    )
    cache_text: bool = opt(
        False,
        "Encode each caption once and reuse the embeddings (not with `method.train_text_encoder` or "
        "`shuffle_tags`). With `cache_latents` too, the VAE and text encoders leave the GPU during training.",
    )
    cache_dir: str | None = opt(
        None, "Cache folder; defaults to `.difftune-cache` beside `output.dir`. Safe to delete.",
    )


@dataclass
class TrainConfig:
    """The optimisation."""

    batch_size: int = opt(1, "Images per step per process.", min=1, max=4096)
    gradient_accumulation: int = opt(1, "Micro-batches accumulated before each optimizer step.", min=1, max=4096)
    max_steps: int | None = opt(
        None, "Optimizer steps to train. When unset, derived from `epochs`.", min=1
    )
    epochs: int = opt(1, "Passes over the data, used when `max_steps` is unset.", min=1)
    learning_rate: float = opt(1e-4, "Peak learning rate.", min=0, min_exclusive=True, max=1.0)
    scale_lr: bool = opt(
        False, "Multiply the learning rate by batch size × gradient accumulation × number of processes."
    )
    lr_scheduler: str = opt(
        "constant",
        "Learning-rate schedule.",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    )
    warmup_steps: int = opt(0, "Linear warm-up steps at the start of the schedule.", min=0)
    lr_cycles: int = opt(1, "Number of restarts for `cosine_with_restarts`.", min=1)
    lr_power: float = opt(1.0, "Power of the `polynomial` schedule.", min=0)
    optimizer: str = opt(
        "adamw",
        "Optimizer: `adamw` (torch), `adamw8bit` (bitsandbytes, CUDA only, extra `difftune[bnb]`), "
        "`prodigy` (extra `difftune[prodigy]`; use learning_rate = 1.0) or `adamw_schedulefree` (schedule-free "
        "AdamW, extra `difftune[schedulefree]`: no learning-rate schedule, `warmup_steps` is its warm-up; "
        "validation, the held-out loss, checkpoints and export use its evaluation weights).",
        choices=("adamw", "adamw8bit", "prodigy", "adamw_schedulefree"),
    )
    adam_beta1: float = opt(0.9, "Adam β1.", min=0.0, max=1.0)
    adam_beta2: float = opt(0.999, "Adam β2.", min=0.0, max=1.0)
    weight_decay: float = opt(1e-2, "Decoupled weight decay.", min=0.0)
    adam_epsilon: float = opt(1e-8, "Adam ε.", min=0.0, min_exclusive=True)
    mixed_precision: str = opt(
        "auto",
        "Autocast precision: `no` (fp32), `bf16` (fast on GPUs and on CPUs with AVX-512 BF16) or "
        "`fp16` (CUDA only, with gradient scaling). `auto` picks `bf16` where the hardware runs it "
        "natively (a bf16-capable CUDA GPU, or a CPU with the `avx512_bf16` or `amx_bf16` flag) and "
        "`no` elsewhere; on a CPU it keeps `no` for a denoiser too small to gain from bf16 (parameters × "
        "latent positions below 5e9, e.g. the embedded base at 64 px, 1.4× faster in fp32; "
        "docs/performance.md). The choice is logged and written to the model card.",
        choices=("auto", "no", "fp16", "bf16"),
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    distributed: str = opt(
        "ddp",
        "How several processes share the work (launch them with `torchrun` or `accelerate launch`, "
        "docs/scaling.md): `ddp` (every process holds the whole model, gradients are averaged) or `fsdp` "
        "(PyTorch's FSDP2 `fully_shard` per block of each trained module: every process holds 1/N of its "
        "weights, gradients and optimizer state, and of the frozen VAE and text encoders when they run every "
        "step, without `data.cache_latents` / `data.cache_text`; checkpoints are sharded). `fsdp` needs 2 or "
        "more processes "
        "and method `full` or `lora` (validation images are sampled by every process, the main one writes them); "
        "with `mixed_precision = \"bf16\"` "
        "the blocks compute in bf16 and reduce gradients in fp32. The start of the run logs the strategy in effect.",
        choices=("ddp", "fsdp"),
    )
    fsdp_cpu_offload: bool = opt(
        False,
        "With `distributed = \"fsdp\"` on GPUs: keep the parameter shards, gradients and optimizer state in "
        "CPU memory (slower, for models that do not fit even sharded). Refused on a machine without a GPU.",
    )
    channels_last: bool = opt(
        False,
        "Store the denoiser's convolution weights channels-last (NHWC). Can speed up convolutions on "
        "GPUs with tensor cores; it made no difference on CPU (docs/performance.md). Measure before keeping it.",
    )
    fused_optimizer: bool = opt(
        True,
        "Run AdamW's update as one fused kernel per device and dtype (`torch.optim.AdamW(fused=True)`, "
        "CPU and CUDA) instead of the multi-tensor `foreach` version: 8 ms → 2 ms per step for the SD 1.5 "
        "benchmark LoRA on CPU. The results agree with `foreach` to fp32 rounding (tests); set to false "
        "for the `foreach` kernels.",
    )
    compile: bool = opt(
        False,
        "Compile the denoiser's training forward and backward with `torch.compile`. The first steps "
        "take longer (the compile time is logged); sampling and saving use the uncompiled module. "
        "CUDA only: on CPU, inductor gave wrong LoRA gradients and no speed-up (docs/performance.md).",
    )
    compile_mode: str = opt(
        "default",
        "`torch.compile` mode when `compile` is on: `default`, `reduce-overhead` (CUDA graphs on GPUs), "
        "`max-autotune` or `max-autotune-no-cudagraphs`.",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    max_grad_norm: float | None = opt(1.0, "Clip the gradient norm to this value; unset to disable.", min=0)
    snr_gamma: float | None = opt(
        None, "Min-SNR-γ loss weighting (5.0 is the paper's recommendation); unset for plain MSE.", min=0,
        min_exclusive=True,
    )
    noise_offset: float = opt(0.0, "Noise offset (e.g. 0.05–0.1) to learn very dark or bright images.", min=0.0, max=1.0)
    loss: str = opt(
        "mse",
        "Loss between prediction and target: `mse`, `l1`, `huber` (pseudo-Huber, 2δ(√(e²+δ²)−δ): quadratic "
        "below δ, linear above, robust to outliers) or `smooth_l1` (2(√(e²+δ²)−δ)). δ is `huber_delta`, "
        "varied over the noise levels by `huber_schedule`.",
        choices=("mse", "l1", "huber", "smooth_l1"),
    )
    huber_delta: float = opt(0.1, "δ of `loss = \"huber\"` / `\"smooth_l1\"`.", min=0, min_exclusive=True)
    huber_schedule: str = opt(
        "snr",
        "How δ of the Huber losses varies with the noise level: `constant`, `snr` (δ at high noise, rising "
        "to 1 at low noise: (1−δ)/(1+σ)²+δ with σ the noise/signal ratio) or `exponential` (δ^(t/T)).",
        choices=("constant", "snr", "exponential"),
    )
    debiased_estimation: bool = opt(
        False,
        "DDPM families: weight the loss by 1/√SNR (1/(SNR+1) for v-prediction), the debiased estimation "
        "loss of Yu et al. 2023, which evens out the noise levels. Combines with `snr_gamma`.",
    )
    timestep_min: int = opt(0, "DDPM families: train only on timesteps ≥ this.", min=0, max=999)
    timestep_max: int | None = opt(
        None, "DDPM families: train only on timesteps ≤ this; unset: the last timestep.", min=0,
    )
    timestep_bias: str = opt(
        "none",
        "DDPM families: draw timesteps more often from the `earlier` (low noise: detail) or `later` "
        "(high noise: composition) `timestep_bias_portion` of the range, `timestep_bias_multiplier` times "
        "as often as the rest.",
        choices=("none", "earlier", "later"),
    )
    timestep_bias_multiplier: float = opt(2.0, "With `timestep_bias`: how much more often the biased part is drawn.",
                                          min=0, min_exclusive=True)
    timestep_bias_portion: float = opt(0.25, "With `timestep_bias`: the share of the timestep range that is biased.",
                                       min=0, max=1.0, min_exclusive=True)
    zero_terminal_snr: bool = opt(
        False,
        "DDPM families with v-prediction: rescale the noise schedule so the last timestep is pure noise (Lin "
        "et al. 2023), which lets the model make very dark and bright images. Validation then samples with "
        "`rescale_betas_zero_snr`, `timestep_spacing = \"trailing\"` and guidance rescale 0.7, and the "
        "model card says so: use the same settings when you generate.",
    )
    input_perturbation: float = opt(
        0.0,
        "DDPM families: add this much extra noise to the noise that makes the input (not to the target), "
        "which reduces exposure bias (Ning et al. 2023; 0.1 is typical).",
        min=0.0, max=1.0,
    )
    weighting_scheme: str = opt(
        "none",
        "Flow-matching families (SD3, Flux): how noise levels σ are drawn and the loss weighted. "
        "`none` (uniform σ, unweighted), `logit_normal` (σ = sigmoid(N(logit_mean, logit_std)), the "
        "SD3 paper's choice), `mode` (heavier middle, see `mode_scale`), `sigma_sqrt` (uniform σ, "
        "loss × σ⁻²) or `cosmap` (uniform σ, cosine-map weighting). DDPM families refuse it (their weighting is `snr_gamma`).",
        choices=("none", "logit_normal", "mode", "sigma_sqrt", "cosmap"),
    )
    logit_mean: float = opt(0.0, "Mean of the normal behind `weighting_scheme = \"logit_normal\"`.")
    logit_std: float = opt(1.0, "Standard deviation for `weighting_scheme = \"logit_normal\"`.", min=0,
                           min_exclusive=True)
    mode_scale: float = opt(1.29, "Scale of `weighting_scheme = \"mode\"` (0 is uniform).")
    flow_shift: float | None = opt(
        None,
        "Flow-matching timestep shift (σ' = s·σ / (1 + (s-1)·σ)); > 1 trains more at high noise. Unset "
        "uses the model's scheduler: a fixed shift for SD3 (3.0), a resolution-dependent one for Flux.",
        min=0, min_exclusive=True,
    )
    guidance_scale: float = opt(
        1.0,
        "Value fed to a guidance-distilled denoiser's guidance embedding during training (Flux dev); "
        "models without one (Flux schnell, SD3, SD) ignore it.",
        min=0.0,
    )
    seed: int = opt(42, "Seed for everything random: data order, augmentation, noise, timesteps, dropout.", min=0)
    checkpoint_every: int = opt(
        500,
        "Write a full training-state checkpoint every N steps (0: none before the end). The last step is always "
        "checkpointed, so a finished run can continue (raise max_steps, resume).",
        min=0,
    )
    checkpoints_keep: int = opt(3, "Keep only the newest N checkpoints (0 keeps all).", min=0)
    resume: str | None = opt(
        None, "Resume from `latest` (newest checkpoint in `output.dir`) or from a checkpoint folder.",
    )
    resume_force: bool = opt(
        False,
        "Resume even if the model, the method or the training data changed since the checkpoint (normally "
        "refused: it mixes two runs). Same as `difftune train --force-resume`.",
    )
    max_nan_steps: int = opt(
        5,
        "A step whose loss is NaN or infinite is skipped (no optimizer step); after this many in a row the run "
        "stops, with the state from before them saved as a checkpoint.",
        min=1,
    )
    log_every: int = opt(10, "Log the loss and learning rate every N steps.", min=1)


@dataclass
class SampleSpec:
    """One validation prompt with its own settings in ``validation.samples``:
    ``{prompt = "a dog", negative_prompt = "blurry", guidance_scale = 5.0, seeds = [1, 2], width = 768, height = 512, steps = 30}``."""

    prompt: str = opt("", "The prompt (required).")
    negative_prompt: str | None = opt(None, "Negative prompt; unset uses `validation.negative_prompt`.")
    guidance_scale: float | None = opt(None, "Guidance scale; unset uses `validation.guidance_scale`.", min=0.0)
    seeds: list[int] = opt(
        [], "Seeds of this prompt's images (one image each); empty: `validation.seed` + 0, 1, … "
        "(`validation.images_per_prompt` images).",
    )
    width: int | None = opt(None, "Width in pixels; unset: `validation.resolution`, else `data.resolution`.", min=8)
    height: int | None = opt(None, "Height in pixels; unset: `validation.resolution`, else `data.resolution`.", min=8)
    steps: int | None = opt(None, "Sampling steps; unset uses `validation.steps`.", min=1, max=1000)


@dataclass
class ValidationConfig:
    """Sample images during training."""

    prompts: list[str] = opt(
        [], "Prompts to sample at each validation with the settings below. With `samples` empty too, no sampling.",
    )
    samples: list[SampleSpec] = opt(
        [],
        "More validation prompts, each with its own settings (a list of tables with keys `prompt`, "
        "`negative_prompt`, `guidance_scale`, `seeds`, `width`, `height`, `steps`; unset keys use the "
        "settings below), e.g. `samples = [{prompt = \"a dog\", seeds = [1, 2], width = 768, height = 512}]`. "
        "Sampled after `prompts`, with the same sampler and pipeline arguments as `difftune generate`.",
    )
    negative_prompt: str = opt("", "Negative prompt for validation samples.")
    every: int = opt(0, "Sample every N steps (0: only at the end of training).", min=0)
    images_per_prompt: int = opt(1, "Images per prompt; image i of a prompt uses seed `seed + i`.", min=1, max=64)
    seed: int = opt(0, "Seed of the first image of each prompt.", min=0)
    steps: int = opt(25, "Inference steps per validation image.", min=1, max=1000)
    guidance_scale: float = opt(7.0, "Classifier-free guidance scale for validation images.", min=0.0)
    resolution: int | None = opt(None, "Sample size in pixels; defaults to `data.resolution`.", min=8)
    holdout: float | str | None = opt(
        None,
        "Held-out images for a validation loss: a fraction of `data.path` (e.g. `0.1`, picked "
        "deterministically from `train.seed` and left out of training) or a folder of images.",
    )
    loss_every: int = opt(
        0, "Evaluate the held-out loss every N steps (0: only at the end). Needs `holdout`.", min=0
    )
    loss_timesteps: int = opt(
        4, "Fixed timesteps per held-out image, evenly spaced, so losses compare across steps and runs.",
        min=1, max=1000,
    )
    patience: int = opt(
        0, "Stop early after this many held-out evaluations without improvement (0: never).", min=0
    )
    holdout_word: str = opt(
        "",
        "A word of the held-out captions naming what the run teaches (the trigger, e.g. `sks`). Each held-out "
        "image is also scored with the word taken out of its caption; how much the word lowers the loss (the "
        "word gain) picks the best checkpoint and drives `patience` instead of the loss. For subjects, "
        "whose held-out loss rises as they are learnt. Needs `holdout`.",
    )


@dataclass
class PriorPreservationConfig:
    """DreamBooth prior preservation (with `lora` or `full`): class images keep the model's idea of the class."""

    class_prompt: str | None = opt(
        None, "Prompt of the class, e.g. `a photo of dog`. Setting it (or `instance_word`) turns prior "
        "preservation on."
    )
    instance_word: str | None = opt(
        None,
        "Instead of `class_prompt`: draw the class images from the instance captions with this word taken "
        "out (`a red sks dog on grass` -> `a red dog on grass`), so that prior preservation guards the "
        "colours, places and styles the captions teach as well as the class word. Captions without the "
        "word (regularisation images) give none; `data.trigger` equal to it counts. Setting it turns prior "
        "preservation on.",
    )
    class_data: str | None = opt(
        None,
        "Folder of class images. Missing images (up to `num_class_images`) are generated with the "
        "base model once, saved here and reused by later runs.",
    )
    num_class_images: int = opt(100, "Class images to use (and to generate when the folder has fewer).", min=1)
    loss_weight: float = opt(1.0, "Weight of the prior (class-image) loss relative to the instance loss.", min=0.0)
    sample_steps: int = opt(25, "Inference steps per generated class image.", min=1, max=1000)
    guidance_scale: float = opt(7.0, "Classifier-free guidance scale for generated class images.", min=0.0)
    sample_batch_size: int = opt(4, "Class images generated per pipeline call.", min=1, max=256)

    @property
    def enabled(self) -> bool:
        """Whether prior preservation is on (a class prompt, or class prompts from the captions)."""
        return bool(self.class_prompt or self.instance_word)


@dataclass
class LoggingConfig:
    """Where metrics go."""

    report_to: str = opt(
        "tensorboard",
        "Tracker: `tensorboard`, `wandb` (extra `difftune[wandb]`; set WANDB_MODE=offline to log "
        "without a network) or `none`.",
        choices=("tensorboard", "wandb", "none"),
    )
    project: str = opt("difftune", "Project name in the tracker.")
    run_name: str | None = opt(None, "Run name in the tracker; defaults to the output folder's name.")


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = opt("runs/difftune", "Output folder for the adapter, model card, samples, logs and checkpoints.")
    license: str = opt("openrail++", "License written into the model card's metadata.")
    existing: str = opt(
        "refuse",
        "When `dir` already holds a run's results (its `config.toml`, checkpoints, adapter or model card) and "
        "`train.resume` is unset: `refuse` (stop before anything is written), `overwrite` (delete that run's "
        "files first; `difftune train --overwrite`) or `new` (write into the first free `dir-2`, `dir-3`, ...; "
        "`--new-folder`). A folder in use by a running run is always refused.",
        choices=("refuse", "overwrite", "new"),
    )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "method": MethodConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "validation": ValidationConfig,
    "prior_preservation": PriorPreservationConfig,
    "logging": LoggingConfig,
    "output": OutputConfig,
}


@dataclass
class Config:
    """A complete, validated run configuration."""

    version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    prior_preservation: PriorPreservationConfig = field(default_factory=PriorPreservationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
