"""Everything a run builds before its first step: the model, the data and the optimisation, in that order.

:func:`setup` returns the :class:`~difftune.training.state.Run` that the step and the end of the run
read. Every family, objective and method is reached through its registry, so this file never
changes when one is added.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difftune.config.active import RunFacts, options_block
from difftune.config.loader import config_to_dict, dump_toml
from difftune.config.schema import Config
from difftune.data import prior
from difftune.data.pipeline import TrainingData, build_training_data, release_if_cached
from difftune.data.sources import Example, ScanResult, load_examples
from difftune.errors import ConfigError
from difftune.fileio import atomic_write_text
from difftune.methods import METHODS
from difftune.methods.base import Method
from difftune.models import resolve_family
from difftune.models.base import Components, ModelFamily, ModelSource
from difftune.models.offload import offload_blocks
from difftune.models.quantize import backend_for, describe
from difftune.objectives import OBJECTIVES, check_train_keys
from difftune.tensors import module_bytes
from difftune.training import checkpointing, resume, speed
from difftune.training.accelerator import main_process_log, make_accelerator, start_trackers
from difftune.training.distributed import (
    Strategy,
    check_launch,
    check_sharded,
    materialised,
    on_main_then_agree,
    receive_shards,
    shard,
    shard_frozen,
    skeleton,
)
from difftune.training.faults import NonFiniteGuard
from difftune.training.holdout import HeldOutLoss
from difftune.training.loss import trains_text
from difftune.training.optim import (
    build_optimizer,
    build_scheduler,
    learning_rate,
    start_training,
    total_steps,
)
from difftune.training.performance import RunMonitor
from difftune.training.precision import (
    autocast_dtype,
    emulated_bf16_warning,
    mixed_precision,
    precision_label,
    weight_dtype,
)
from difftune.training.progress import RunProgress
from difftune.training.run_folder import RunFolder
from difftune.training.state import LossMeter, Run, RunPaths, RunResult, Trainee


@dataclass
class LoadedModel:
    """The base model as loaded, and the class images it made (prior preservation) before training changed it."""

    family: ModelFamily
    components: Components
    class_examples: list[Example]
    #: The training data, if it was built while only the frozen parts were loaded (see :func:`load_model`).
    data: TrainingData | None = None
    #: The data folder's scan, if the class prompts needed it (``prior_preservation.instance_word``): the
    #: training data reuses it instead of probing every image again.
    scan: ScanResult | None = None


def load_model(config: Config, device: torch.device, *, is_main: bool = True, barrier=lambda: None,
               log=print, encode=None) -> LoadedModel:
    """Resolve and load the base model in the frozen-weight dtype; make missing class images with it.

    With ``encode`` (``(family, components) -> TrainingData``) and every input cached, the VAE and
    text encoders load first, ``encode`` fills the caches, they are released, and only then the
    denoiser loads: the encoders and the denoiser never share memory.
    """
    family, source = resolve_family(config.model, config.train)
    check_train_keys(family.objective, family.title, config.train)  # before any weights load
    denoiser = "denoiser" if is_main or not loads_once(config, source) else "meta_denoiser"
    if encode is not None and encodes_first(config, source):
        components = family.load(source, dtype=weight_dtype(config), which="frozen")
        _move_encoders(components, device)
        data = encode(family, components)
        release_if_cached(config, components)
        components.denoiser = family.load(source, dtype=weight_dtype(config), which=denoiser).denoiser
        return LoadedModel(family, components, [], data)
    if denoiser == "meta_denoiser":  # the main process loads the weights, this one receives its shards
        components = family.load(source, dtype=weight_dtype(config), which="frozen")
        components.denoiser = family.load(source, dtype=weight_dtype(config), which=denoiser).denoiser
        components.denoiser_config = None
        return LoadedModel(family, components, [])
    components = family.load(source, dtype=weight_dtype(config))
    scan = load_examples(config.data, log if is_main else None) if prior.prompts_from_captions(config) else None
    classes = prior.class_examples(config, family, components, device, is_main=is_main, barrier=barrier, log=log,
                                   examples=scan.examples if scan else None)
    return LoadedModel(family, components, classes, scan=scan)


def loads_once(config: Config, source: ModelSource) -> bool:
    """FSDP: whether only the main process reads the denoiser's weights (the others build it on the meta
    device, shard it and receive their shards). Needs a diffusers folder or Hub id, an unquantised,
    not offloaded denoiser, and no class images to make (they are made with the denoiser)."""
    return (config.train.distributed == "fsdp" and source.kind != "single_file" and config.model.quantize == "none"
            and config.model.offload == "none" and not config.prior_preservation.enabled)


def encodes_first(config: Config, source: ModelSource) -> bool:
    """Whether a run can fill its caches and release the encoders before the denoiser is loaded.

    Needs both caches, no trained text encoder and no learned tokens (they live in the encoders), a
    method that leaves the denoiser's own weights frozen, no prior preservation (class images are made
    with the denoiser) and a diffusers folder or Hub id (a single file loads whole).
    """
    cfg = config.data
    return (cfg.cache_latents and cfg.cache_text and not config.method.train_text_encoder and not config.method.token
            and not METHODS.get(config.method.type).trains_denoiser_weights
            and not config.prior_preservation.enabled and source.kind != "single_file")


def _move_encoders(components: Components, device: torch.device) -> None:
    # A function, not a loop in the caller: a loop variable would keep the last encoder alive after release.
    for module in (components.vae, *components.text_encoders):
        if module is not None:
            module.to(device)


def fill_caches(config: Config, log=print) -> TrainingData:
    """``difftune cache``: load the model and fill the latent and text caches ahead of training."""
    if not (config.data.cache_latents or config.data.cache_text):
        raise ConfigError("data.cache_latents / data.cache_text: both are off, so there is nothing to cache; "
                          "set one of them to true")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(config, device, log=log)
    _move_encoders(model.components, device)
    return build_training_data(config, model.family, model.components, class_examples=model.class_examples,
                               log=log, progress=True, scan=model.scan)


def setup(config: Config, log=print, output: RunFolder | None = None) -> Run:
    """Build the run: model, method and objective; data; optimizer and schedule; restored if resuming.

    Nothing is written before the model has loaded; then the main process claims the output folder
    (``output``, see :mod:`difftune.training.run_folder`) and writes ``config.toml``.
    """
    output = output or RunFolder(config.output, config.train.resume)
    config = _in_folder(config, output.check())
    paths, accelerator, strategy, say = _start(config, output.root, log)
    loaded, method, objective = _model(config, accelerator, log)
    # The main process claims the folder before any process writes into it; if it may not, all stop.
    on_main_then_agree(accelerator, lambda: _claim(output, paths, config, say))
    components = loaded.components
    data, held_out, fingerprint = _data(config, loaded, accelerator, say)
    skeletons = _shard(config, strategy, method, components, accelerator, log)
    method.start_ema(components)  # after sharding: FSDP replaces the parameters (the EMA averages its shards)
    steps = total_steps(config.train, data.order.batches_per_epoch)
    lr = learning_rate(config.train, accelerator.num_processes)
    optimizer = build_optimizer(method.param_groups(components, lr), config.train, accelerator.device)
    scheduler = build_scheduler(optimizer, config.train, steps)
    folder = checkpointing.resume_folder(config, paths, accelerator, say)
    state = checkpointing.load_for_resume(folder, config, fingerprint, accelerator, say) if folder else None
    info = resume.CheckpointInfo.read(state.info) if state else None
    lr_segments = [[0, lr]]
    if state is not None:
        ratio = checkpointing.restore_before_wrapping(state, method, components, optimizer, scheduler,
                                                      strategy.shards, say)
        say(f"resumed from {folder} at step {state.step}")
        lr_segments = checkpointing.learning_rate_segments(info, lr * ratio, lr, say)
        if held_out is not None:
            held_out.keeper.resume(paths.checkpoints, state.step)
    guard = NonFiniteGuard(config.train.max_nan_steps, info.skipped_steps if info else 0)
    model, optimizer = _wrap(config, accelerator, loaded, method, objective, optimizer, say, strategy, skeletons)
    if state is not None:
        checkpointing.restore_after_wrapping(state, accelerator, say)
    step = state.step if state else 0
    data.order.start = resume.resume_micro_batch(info, config.train.gradient_accumulation) if info else 0
    live = RunProgress(paths.logs, steps, step, enabled=accelerator.is_main_process)
    monitor = RunMonitor(accelerator.device, compiled=config.train.compile)
    start_trackers(accelerator, config, paths.root.name)
    say(_banner(config, model, len(data.dataset), steps, lr, accelerator))
    if warning := emulated_bf16_warning(config, accelerator.device):
        say(warning)
    say(_options(config, model, optimizer, paths, accelerator.is_main_process))
    run = Run(config=config, paths=paths, accelerator=accelerator, say=say, model=model, data=data,
              held_out=held_out, optimizer=optimizer, scheduler=scheduler, guard=guard, monitor=monitor,
              batches=_batches(config, data, monitor), lr=lr, total_steps=steps, step=step, first_step=step,
              first_micro_batch=data.order.start, fingerprint=fingerprint, result=RunResult(paths.root, [], steps),
              progress=_progress(steps, step, accelerator.is_main_process), live=live,
              losses=LossMeter(torch.zeros((), device=accelerator.device)), saved_step=step, folder=output,
              lr_segments=lr_segments)
    for module in model.trainable_modules():
        module.train()
    start_training(optimizer)
    return run


def _in_folder(config: Config, root: Path) -> Config:
    """``config`` with ``output.dir`` naming the folder the run writes to (a new numbered one, ``output.existing``)."""
    if root == Path(config.output.dir).expanduser():
        return config
    return dataclasses.replace(config, output=dataclasses.replace(config.output, dir=str(root)))


def _claim(output: RunFolder, paths: RunPaths, config: Config, say) -> None:
    output.claim(say)
    atomic_write_text(paths.root / "config.toml", dump_toml(config_to_dict(config)))


def _start(config: Config, root: Path, log) -> tuple[RunPaths, object, Strategy, object]:
    """The run's paths, the accelerator, and the strategy really in effect (stated in the run's first line)."""
    paths = RunPaths(root)
    accelerator = make_accelerator(config, paths)
    strategy = check_launch(config, accelerator)
    say = main_process_log(accelerator, log)
    say(strategy.describe())
    return paths, accelerator, strategy, say


def _shard(config: Config, strategy: Strategy, method: Method, components: Components, accelerator,
           log) -> dict[str, torch.nn.Module]:
    """FSDP: shard the trained modules in place (before the optimizer sees their parameters), and the
    frozen ones that run every step, and check what this process holds; return their skeletons (the
    export gathers the weights into them)."""
    if not strategy.shards:
        return {}
    trainable = method.trainable_modules(components)
    skeletons = {role: skeleton(module) for role, module in trainable.items()}
    once = loads_once(config, components.source)
    if once:
        loaded, total = materialised(components.denoiser)
        log(f"fsdp: process {accelerator.process_index} loaded {loaded:,} of {total:,} parameters of the denoiser "
            "from the model (the main process loads it once and sends each process its shard)")
    full = components.denoiser.state_dict() if once and accelerator.is_main_process else {}
    shard(trainable, autocast_dtype(config), config.train.fsdp_cpu_offload)
    if once:
        receive_shards(components.denoiser, full, accelerator.device)
        del full
    local, total = check_sharded(trainable.values(), strategy.world)
    log(f"fsdp: process {accelerator.process_index} holds {local:,} of {total:,} parameters of "
        f"{', '.join(trainable)} ({100 * local / total:.1f}%)")
    frozen = frozen_every_step(config, components, trainable)
    if frozen:
        skeletons.update({role: skeleton(module) for role, module in frozen.items()})
        shard_frozen(frozen)
        local, total = check_sharded(frozen.values(), strategy.world)
        log(f"fsdp: process {accelerator.process_index} holds {local:,} of {total:,} frozen parameters of "
            f"{', '.join(frozen)} ({100 * local / total:.1f}%; they run every step)")
    return skeletons


def frozen_every_step(config: Config, components: Components, trainable: dict) -> dict[str, torch.nn.Module]:
    """The frozen modules a step runs, by role: the VAE without ``data.cache_latents``, text encoders that
    do not train without ``data.cache_text`` (unquantised). With the caches they only fill them (each
    process a different share), so they stay whole there and are released."""
    if components.encoders_offloaded:
        return {}
    parts = components.by_role()
    frozen = {}
    if not config.data.cache_latents and parts["vae"] is not None:
        frozen["vae"] = parts["vae"]
    if not config.data.cache_text and config.model.quantize_text_encoders == "none":
        frozen.update({role: parts[role] for role in components.encoder_names
                       if parts[role] is not None and role not in trainable})
    return frozen


def _model(config: Config, accelerator, log) -> tuple[LoadedModel, Method, object]:
    """The base model (on the device), the method's trainable parameters in it, and the objective."""
    def encode(family: ModelFamily, components: Components) -> TrainingData:
        return _build_data(config, family, components, [], accelerator, main_process_log(accelerator, log))

    loaded = load_model(config, accelerator.device, is_main=accelerator.is_main_process,
                        barrier=accelerator.wait_for_everyone, log=log, encode=encode)  # class images from the base
    family, components = loaded.family, loaded.components
    if accelerator.is_main_process:
        _log_quantisation(config, components, log)
    method = METHODS.get(config.method.type).build(config.method, family)
    torch.manual_seed(config.train.seed)  # new weights (LoRA A matrices, ...) start from the seed too
    method.prepare(components)
    for note in method.notes if accelerator.is_main_process else ():
        log(note)
    objective = OBJECTIVES.get(family.objective)(family.objective_settings(components), config.train)
    if objective.sampling.get("scheduler"):  # e.g. zero terminal SNR: validation and export sample to match
        scheduler = components.noise_scheduler
        components.noise_scheduler = type(scheduler).from_config(scheduler.config, **objective.sampling["scheduler"])
    # FSDP moves each trained module's shards to the device itself: the whole module never lands there.
    sharded = method.trainable_modules(components).values() if config.train.distributed == "fsdp" else ()
    frozen = [] if components.encoders_offloaded else [components.vae, *components.text_encoders]
    for module in frozen:
        if module is not None and not any(module is m for m in sharded):
            module.to(accelerator.device)
    if config.model.offload == "blocks":  # frozen block weights stay on the host, each visits the GPU in turn
        offload_blocks(components.denoiser, accelerator.device, checkpointed=config.train.gradient_checkpointing)
    elif not any(components.denoiser is m for m in sharded):
        components.denoiser.to(accelerator.device)
    if config.train.gradient_checkpointing:
        for module in method.trainable_modules(components).values():
            _enable_gradient_checkpointing(module)
    return loaded, method, objective


def _log_quantisation(config: Config, components: Components, log) -> None:
    """Say which parts are quantised, how, and the denoiser's size in memory."""
    parts = []
    for what, mode, key in (("denoiser", config.model.quantize, "model.quantize"),
                            ("text encoders", config.model.quantize_text_encoders, "model.quantize_text_encoders")):
        if mode != "none":
            parts.append(f"{what} {describe(mode, backend_for(mode, key))}")
    if parts:
        log(f"quantised: {', '.join(parts)}; denoiser weights {module_bytes(components.denoiser) / 2**30:.2f} GiB")


def _enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
    elif hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable()


def _data(config: Config, loaded: LoadedModel, accelerator, say) -> tuple[TrainingData, HeldOutLoss | None, str]:
    """This process's order of micro-batches (caches filled here), the held-out loss, the examples' fingerprint."""
    data = loaded.data or _build_data(config, loaded.family, loaded.components, loaded.class_examples,
                                      accelerator, say, loaded.scan)
    held_out = None
    if data.held_out:
        held_out = HeldOutLoss(data.held_out, config.data, config.validation, config.train.seed,
                               config.train.batch_size)
    release_if_cached(config, loaded.components)
    return data, held_out, resume.dataset_fingerprint(data.scan.examples)


def _build_data(config: Config, family: ModelFamily, components: Components, class_examples: list[Example],
                accelerator, say, scan: ScanResult | None = None) -> TrainingData:
    return build_training_data(config, family, components, class_examples=class_examples,
                               rank=accelerator.process_index, world=accelerator.num_processes,
                               barrier=accelerator.wait_for_everyone, log=say, progress=accelerator.is_main_process,
                               scan=scan)


def _wrap(config: Config, accelerator, loaded: LoadedModel, method: Method, objective, optimizer,
          say, strategy: Strategy, skeletons: dict) -> tuple[Trainee, torch.optim.Optimizer]:
    """Hand the trainable modules and the optimizer to the accelerator (DDP; FSDP modules are sharded
    already and compute in the mixed-precision policy's dtype); apply the speed settings."""
    components = loaded.components
    trainable = method.trainable_modules(components)
    prepared = [*trainable.values(), optimizer] if strategy.shards else accelerator.prepare(*trainable.values(),
                                                                                            optimizer)
    wrapped = dict(zip(trainable, prepared[:-1], strict=True))
    train_view = components.with_modules(wrapped)
    if autocast_dtype(config) is not None and not strategy.shards:
        method.on_autocast(train_view)
    train_view = speed.apply(config.train, components, train_view, say)
    params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
    return Trainee(loaded.family, components, method, objective, wrapped, train_view, params,
                   trains_text(train_view), strategy, skeletons), prepared[-1]


def _batches(config: Config, data: TrainingData, monitor: RunMonitor):
    """Micro-batches from the data order, timed while the step waits for them."""
    loader = torch.utils.data.DataLoader(
        data.dataset, batch_sampler=data.order, collate_fn=data.collate, num_workers=config.data.num_workers,
        persistent_workers=config.data.num_workers > 0,
    )
    return monitor.timed(iter(loader))


def _progress(steps: int, step: int, is_main: bool):
    return tqdm(total=steps, initial=step, disable=not is_main, desc="train", unit="step", dynamic_ncols=True)


def run_facts(config: Config, model: Trainee) -> RunFacts:
    """What the loaded model adds to the active-options block."""
    targets = getattr(model.method, "denoiser_targets", None)
    prediction = getattr(model.objective, "prediction_type", "velocity")
    return RunFacts(family=model.family.title, objective=model.family.objective, prediction=prediction,
                    targets=targets() if targets else None, precision=precision_label(config),
                    sampling=model.objective.sampling or None)


def _options(config: Config, model: Trainee, optimizer, paths: RunPaths, is_main: bool) -> str:
    """The active-options block with the optimizer's learning rate per group; also ``logs/options.txt``."""
    groups = [g for g in optimizer.param_groups if g.get("name")]
    block = options_block(config, run_facts(config, model))
    if len(groups) > 1:
        # initial_lr: the rate each group was given (lr itself is already scaled by the warm-up's first step)
        block += "\n  learning rates: " + ", ".join(f"{g['name']} {g.get('initial_lr', g['lr']):g}" for g in groups)
    if is_main:
        paths.logs.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.logs / "options.txt", block + "\n")
    return block


def _banner(config: Config, model: Trainee, images: int, steps: int, lr: float, accelerator) -> str:
    """The run's first line: what trains, on what, how long, how."""
    t = config.train
    return (f"training {model.family.title} with {model.method.name}: {images} images, {steps} steps, "
            f"batch {t.batch_size}×{t.gradient_accumulation}×{accelerator.num_processes}, lr {lr:g}, "
            f"{sum(p.numel() for p in model.params):,} trainable parameters, device {accelerator.device}, "
            f"mixed precision {mixed_precision(config)}")
