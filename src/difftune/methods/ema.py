"""An exponential moving average of a method's trained parameters, for every method.

For LoRA it averages the adapter matrices, for textual inversion the token embeddings, for full
fine-tuning every trained weight. The average lives beside the weights (``diffusers``' ``EMAModel``);
a run swaps it in for validation and export (``Run.evaluating``) and saves it in checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

#: Prefix of the EMA tensors in a checkpoint's ``trainable`` state.
PREFIX = "ema/"


class WeightsEMA:
    """EMA of the parameters ``params`` (``role.name`` → parameter, in a fixed order).

    Sharded parameters (FSDP2 DTensors) are averaged shard by shard: each process keeps the average of
    its own local shards, with no communication per step; :meth:`sharded_state` presents them as
    DTensors laid out like the parameters, so ``torch.distributed.checkpoint`` saves and reloads them
    over any number of processes, and swapping them in lets the export gather them like the weights.
    """

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.names = list(params)
        self.params = list(params.values())
        with torch.no_grad():
            self.model = EMAModel([_local(p) for p in self.params], decay=decay)

    def step(self) -> None:
        """Move the average toward the current weights (after each optimizer step); the update is
        diffusers' ``EMAModel.step``, applied to each process's part of each parameter."""
        model = self.model
        model.to(device=_local(self.params[0]).device)
        model.optimization_step += 1
        decay = model.get_decay(model.optimization_step)
        model.cur_decay_value = decay
        with torch.no_grad():
            for shadow, p in zip(model.shadow_params, self.params, strict=True):
                if p.requires_grad:
                    shadow.sub_((1 - decay) * (shadow - _local(p)))
                else:
                    shadow.copy_(_local(p))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{PREFIX}{n}": p.detach().clone() for n, p in zip(self.names, self.model.shadow_params, strict=True)}
        state[f"{PREFIX}optimization_step"] = torch.tensor(self.model.optimization_step)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if f"{PREFIX}{n}" not in state]
        if missing or f"{PREFIX}optimization_step" not in state:
            raise ValueError(f"checkpoint has no EMA weights for {missing[:3] or ['its step']} (was it saved without "
                             "method.ema?)")
        self.model.optimization_step = int(state[f"{PREFIX}optimization_step"])
        self.model.shadow_params = [state[f"{PREFIX}{n}"].to(_local(p).device).clone()
                                    for n, p in zip(self.names, self.params, strict=True)]

    def sharded_state(self) -> dict[str, object]:
        """The average for ``torch.distributed.checkpoint``: ``{"weights": {name: tensor}, "step": tensor}``,
        each tensor sharing memory with the average, a DTensor laid out like its parameter if that is one
        (loading writes into them; :meth:`loaded_sharded` takes the step back)."""
        from torch.distributed.tensor import DTensor

        weights = {}
        for name, p, shadow in zip(self.names, self.params, self.model.shadow_params, strict=True):
            if isinstance(p, DTensor):
                shadow = DTensor.from_local(shadow, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            weights[name] = shadow
        return {"weights": weights, "step": torch.tensor(self.model.optimization_step)}

    def loaded_sharded(self, state: dict[str, object]) -> None:
        """Take over what ``torch.distributed.checkpoint`` loaded into :meth:`sharded_state`'s tensors."""
        with torch.no_grad():
            for name, shadow in zip(self.names, self.model.shadow_params, strict=True):
                loaded = _local(state["weights"][name])
                if loaded.data_ptr() != shadow.data_ptr():
                    shadow.copy_(loaded)
        self.model.optimization_step = int(state["step"])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in place of the trained ones; the trained ones come back exactly afterwards
        (sharded parameters: each process swaps its own shards)."""
        with torch.no_grad():
            saved = [_local(p).clone() for p in self.params]
            for p, shadow in zip(self.params, self.model.shadow_params, strict=True):
                _local(p).copy_(shadow.to(_local(p).device))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, saved, strict=True):
                    _local(p).copy_(value)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded (DTensor) tensor, sharing its memory; anything else as it is.
    (Call under ``torch.no_grad()`` to write into it.)"""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


#: Prefix of the EMA tensors in checkpoints of full fine-tuning written before the EMA covered every
#: method: ``ema.<role>.<i>`` (the i-th parameter of the role's module) and ``ema.<role>.optimization_step``.
LEGACY_PREFIX = "ema."


def upgrade_legacy(state: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``state`` with the EMA tensors of an older full fine-tuning checkpoint renamed to today's keys."""
    legacy = {k for k in state if k.startswith(LEGACY_PREFIX) and k.split(".")[1] in modules}
    if not legacy:
        return state
    out = {k: v for k, v in state.items() if k not in legacy}
    for role, module in modules.items():
        names = [name for name, _ in module.named_parameters()]
        for i, name in enumerate(names):
            key = f"{LEGACY_PREFIX}{role}.{i}"
            if key in state:
                out[f"{PREFIX}{role}.{name}"] = state[key]
        step = state.get(f"{LEGACY_PREFIX}{role}.optimization_step")
        if step is not None:
            out[f"{PREFIX}optimization_step"] = step
    return out


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's trainable state as (the method's tensors, the EMA's tensors)."""
    own = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    return own, {k: v for k, v in state.items() if k.startswith(PREFIX)}
