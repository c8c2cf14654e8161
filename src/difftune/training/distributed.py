"""How the processes of a run share the work: data-parallel (``ddp``, every process holds everything) or
sharded (``fsdp``: PyTorch's FSDP2 ``fully_shard``, each process holds 1/N of the trained modules).

Nothing here trusts the launcher: :func:`check_launch` compares what the launcher's environment says
with what the run sees and refuses a launch that would quietly run as something else, and
:func:`check_sharded` counts the parameters each process really holds after sharding.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from difftune.config.schema import Config
from difftune.errors import DifftuneError
from difftune.training.accelerator import no_sync

#: Environment variables accelerate sets when its own FSDP or DeepSpeed plugin is configured.
ACCELERATE_PLUGINS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")


@dataclass
class Strategy:
    """What is really running: the strategy, the processes and the collective backend."""

    name: str
    world: int
    per_node: int
    backend: str

    @property
    def shards(self) -> bool:
        return self.name == "fsdp"

    @property
    def nodes(self) -> int:
        return max(1, self.world // max(1, self.per_node))

    def no_sync(self, accelerator, modules: dict[str, nn.Module]):
        """Keep a micro-batch's gradients local (all micro-batches of a step but the last)."""
        if self.shards:
            return no_gradient_sync(modules.values())
        return no_sync(accelerator, modules.values())

    def describe(self) -> str:
        return (f"processes: strategy {self.name}, world size {self.world}, {self.per_node} per node "
                f"on {self.nodes} node(s), backend {self.backend}")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else None


def _backend() -> str:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return str(dist.get_backend())
    return "none"


LAUNCH_HINT = ("Launch with torchrun --nproc_per_node N -m difftune train CONFIG, or accelerate launch --multi_gpu "
               "--num_processes N -m difftune train CONFIG (also on a machine without GPUs: not --cpu), and for "
               "several machines see docs/scaling.md")


def _refuse_partial_launch(world: int) -> None:
    """The launcher asked for more processes than this run sees (they would train separately)."""
    launched = _env_int("WORLD_SIZE")
    if launched is not None and launched != world:
        raise DifftuneError(f"the launcher started {launched} processes (WORLD_SIZE={launched}) but this run sees "
                            f"{world}: they would train separately. {LAUNCH_HINT}")
    if launched is None and world == 1 and os.environ.get("MASTER_ADDR"):
        # accelerate launch --cpu with --num_processes/--num_machines > 1 starts plain single processes.
        raise DifftuneError(f"the launcher set MASTER_ADDR={os.environ['MASTER_ADDR']} for a multi-process run "
                            f"but started this one as a single process (no WORLD_SIZE): each would train alone. "
                            f"{LAUNCH_HINT}")


def check_launch(config: Config, accelerator) -> Strategy:
    """The strategy in effect, after refusing launches that would run as something else than asked."""
    world = accelerator.num_processes
    _refuse_partial_launch(world)
    plugin = [name for name in ACCELERATE_PLUGINS if os.environ.get(name, "").lower() in ("1", "true")]
    kind = str(getattr(accelerator, "distributed_type", ""))
    if plugin or kind.endswith(("FSDP", "DEEPSPEED")):
        raise DifftuneError(
            f"accelerate's own {'/'.join(plugin) or kind} plugin is configured: difftune shards by itself and "
            "accelerate's plugin does not shard on CPU. Launch with accelerate launch --multi_gpu (no "
            "distributed_type FSDP/DEEPSPEED in the accelerate config) or torchrun, and set "
            "train.distributed = \"fsdp\"")
    if config.train.distributed == "fsdp" and world < 2:
        raise DifftuneError(
            "train.distributed: \"fsdp\" shards over several processes but this run has 1; launch it with "
            "torchrun --nproc_per_node 2 -m difftune train CONFIG (or accelerate launch --multi_gpu "
            "--num_processes 2), or set train.distributed = \"ddp\" for one process")
    if config.train.fsdp_cpu_offload and not torch.cuda.is_available():
        raise DifftuneError("train.fsdp_cpu_offload: there is no GPU, the parameters are in CPU memory already; "
                            "set train.fsdp_cpu_offload = false")
    per_node = _env_int("LOCAL_WORLD_SIZE") or world
    return Strategy(config.train.distributed, world, per_node, _backend())


def skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are on the meta device (no memory): the export of a sharded
    module loads the gathered weights into it. Buffers are copied as they are."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def blocks(module: nn.Module) -> list[nn.Module]:
    """The module's repeated blocks, innermost first: every element of every ``nn.ModuleList`` inside it
    (a UNet's resnets, attention and transformer blocks, then its down/up blocks; a transformer's
    blocks; a text encoder's layers). Each becomes one FSDP unit, so at most a block's weights are
    gathered at a time."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            visit(child)
            if isinstance(child, nn.ModuleList):
                found.extend(child)

    visit(module)
    return found


def shard(modules: dict[str, nn.Module], mixed: torch.dtype | None, cpu_offload: bool = False) -> None:
    """``fully_shard`` each block of each trained module, innermost first, then the module itself (in
    place; the parameters move to this process's device). ``mixed``: the dtype blocks compute in
    (gradients are reduced in fp32)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=mixed, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for module in modules.values():
        for block in blocks(module):
            fully_shard(block, mp_policy=policy, offload_policy=offload)
        fully_shard(module, mp_policy=policy, offload_policy=offload)


def shard_frozen(modules: dict[str, nn.Module]) -> None:
    """``fully_shard`` frozen modules that run every step (forward only: no gradients, no optimizer state)
    per block, then the module itself, each resharded after every forward (the module's own weights
    too: there is no backward to free them). Their ``encode`` / ``decode`` methods (a VAE's) gather the
    weights like ``forward``."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for module in modules.values():
        for block in blocks(module):
            fully_shard(block, reshard_after_forward=True)
        fully_shard(module, reshard_after_forward=True)
        for name in ("encode", "decode"):
            if callable(getattr(module, name, None)):
                register_fsdp_forward_method(module, name)


def materialised(module: nn.Module) -> tuple[int, int]:
    """(parameters of ``module`` that hold memory, all its parameters): not those on the meta device."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if not p.is_meta), sum(p.numel() for p in params)


def receive_shards(module: nn.Module, full: dict, device: torch.device) -> None:
    """After :func:`shard`: fill a sharded module built on the meta device with this process's shard of
    the weights the main process loaded (``full``, its whole state dict; empty on the others), and every
    buffer with the main process's (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers()):
        module.to_empty(device=device)
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


def check_sharded(modules: Iterable[nn.Module], world: int) -> tuple[int, int]:
    """(parameters this process holds, parameters in total) of sharded modules; raises if any parameter
    is not sharded over all ``world`` processes (FSDP asked for but not running)."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for module in modules:
        for name, p in module.named_parameters():
            if not isinstance(p, DTensor) or p.device_mesh.size() != world:
                raise DifftuneError(f"train.distributed = \"fsdp\": parameter {name} is not sharded over the "
                                    f"{world} processes; this launch is not running FSDP")
            local += p.to_local().numel()
            total += p.numel()
    return local, total


@contextlib.contextmanager
def no_gradient_sync(modules: Iterable[nn.Module]):
    """FSDP: keep this micro-batch's gradients local (reduce-scattered with the last micro-batch's)."""
    modules = list(modules)
    for m in modules:
        m.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for m in modules:
            m.set_requires_gradient_sync(True)


def local_part(tensor):
    """This process's shard of a sharded (DTensor) tensor; anything else as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def all_agree(accelerator, value: bool) -> bool:
    """True on every process if ``value`` is true on every process (a collective)."""
    flag = torch.tensor([0.0 if value else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def on_main_then_agree(accelerator, action) -> None:
    """Run ``action`` on the main process; if it refuses (``DifftuneError``), every process stops, not
    only the main one (the others would wait for it forever). The main process raises the reason."""
    error = None
    if accelerator.is_main_process:
        try:
            action()
        except DifftuneError as exc:
            error = exc
    if accelerator.num_processes > 1 and not all_agree(accelerator, error is None) and error is None:
        raise DifftuneError("the main process (rank 0) refused to start this run; its message says why")
    if error is not None:
        raise error


def full_value(tensor):
    """A sharded (DTensor) scalar as a plain tensor; anything else as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def gathered(modules: dict[str, nn.Module], skeletons: dict[str, nn.Module], is_main: bool) -> dict[str, nn.Module]:
    """The full weights of sharded modules, gathered into their skeletons on the main process (a
    collective: every process calls it; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {}
    for role, module in modules.items():
        state = get_model_state_dict(module, options=options)
        if is_main:
            replica = skeletons[role]
            replica.load_state_dict(state, assign=True)
            out[role] = replica
    return out


def _state_dicts(modules: dict[str, nn.Module], optimizer, ema=None) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(nn.ModuleDict(modules), optimizer,
                                  options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model, "optimizer": optim}
    if ema is not None:
        state["ema"] = ema.sharded_state()
    return state


def save_sharded(folder, modules: dict[str, nn.Module], optimizer, ema=None) -> None:
    """Every process writes its shard of the trained weights, optimizer state and (``ema``) moving average
    into ``folder`` (``torch.distributed.checkpoint``; a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_dicts(modules, optimizer, ema), checkpoint_id=folder)


def load_sharded(folder, modules: dict[str, nn.Module], optimizer, ema=None) -> None:
    """Load a sharded checkpoint into the modules, optimizer and ``ema`` as this run holds them: sharded
    over any number of processes, or whole in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state_dicts(modules, optimizer, ema)
    if ema is not None and not any(key.startswith("ema.") for key in dcp.FileSystemReader(folder).read_metadata()
                                   .state_dict_metadata):
        raise DifftuneError("method.ema: cannot resume: the checkpoint has no EMA weights (was it saved without "
                            "method.ema?); resume without method.ema, or start afresh")
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(nn.ModuleDict(modules), optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=StateDictOptions(ignore_frozen_params=True))
    if ema is not None:
        ema.loaded_sharded(state["ema"])
