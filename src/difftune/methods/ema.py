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
    """EMA of the parameters ``params`` (``role.name`` → parameter, in a fixed order)."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.names = list(params)
        self.params = list(params.values())
        self.model = EMAModel(self.params, decay=decay)

    def step(self) -> None:
        """Move the average toward the current weights (after each optimizer step)."""
        self.model.to(device=self.params[0].device)
        self.model.step(self.params)

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
        self.model.shadow_params = [state[f"{PREFIX}{n}"].to(p.device).clone()
                                    for n, p in zip(self.names, self.params, strict=True)]

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in place of the trained ones; the trained ones come back exactly afterwards."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, shadow in zip(self.params, self.model.shadow_params, strict=True):
                p.copy_(shadow.to(p.device))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, saved, strict=True):
                    p.copy_(value)


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
