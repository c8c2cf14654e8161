"""The method seam: which parameters train, how they are grouped, and what gets saved."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.config.schema import MethodConfig
from difftune.data.batch import Batch
from difftune.errors import DifftuneError
from difftune.models.base import Components, ModelFamily


class Method(ABC):
    """A fine-tuning method. Subclasses are registered in ``difftune.methods.METHODS``, with their config rules."""

    name: str = ""
    #: True if the export writes the frozen parts too (a whole pipeline folder): a sharded run gathers
    #: the frozen modules it sharded (they run every step without caches) before exporting.
    exports_frozen_modules: bool = False

    def __init__(self, cfg: MethodConfig, family: ModelFamily) -> None:
        #: The run's ``[method]`` section.
        self.cfg = cfg
        self.family = family
        #: The moving average of the trained parameters (``method.ema``), made by :meth:`start_ema`.
        self.ema = None
        #: What :meth:`prepare` adapted to the model (e.g. default targets it lacks), for the run's log.
        self.notes: list[str] = []

    def start_ema(self, components: Components) -> None:
        """With ``method.ema``: start the average of every trainable parameter (call after :meth:`prepare`)."""
        from difftune.methods.ema import WeightsEMA
        from difftune.methods.lr_groups import named_trainable

        if self.cfg.ema:
            params = {f"{role}.{name}": p for role, name, p in named_trainable(self.trainable_modules(components))}
            self.ema = WeightsEMA(params, self.cfg.ema_decay)

    def after_step(self, step: int, components: Components) -> None:
        """What follows every optimizer step that changed the weights: the method's hook, then the EMA."""
        self.on_step_end(step, components)
        if self.ema is not None:
            self.ema.step()

    @abstractmethod
    def prepare(self, components: Components) -> None:
        """Freeze what stays fixed and make the trainable parameters (in fp32)."""

    @abstractmethod
    def trainable_modules(self, components: Components) -> dict[str, nn.Module]:
        """Modules that hold trainable parameters, by role: ``denoiser``, ``text_encoder``, ``text_encoder_2``.

        The loop wraps exactly these for distributed training and mixed precision.
        """

    def param_groups(self, components: Components, learning_rate: float) -> list[dict[str, Any]]:
        """Named groups with their learning rates (text encoders, ``block_lr``, LoRA+: :mod:`.lr_groups`)."""
        from difftune.methods.lr_groups import lr_groups, named_trainable

        return lr_groups(named_trainable(self.trainable_modules(components)), learning_rate, self.cfg, self.family)

    def trainable_state_dict(self, components: Components) -> dict[str, torch.Tensor]:
        """Every trainable tensor, keyed ``role.parameter_name``: what a checkpoint must restore."""
        state = {}
        for role, module in self.trainable_modules(components).items():
            for name, p in module.named_parameters():
                if p.requires_grad:
                    state[f"{role}.{name}"] = p.detach().clone()
        return state

    def load_trainable_state_dict(self, components: Components, state: dict[str, torch.Tensor]) -> None:
        self.check_state_keys(components, state)
        self.copy_parameters(components, state)

    def check_state_keys(self, components: Components, state: dict[str, torch.Tensor]) -> None:
        """A checkpoint must hold exactly the tensors this run trains."""
        expected = set(self.trainable_state_dict(components))
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise DifftuneError(
                f"train.resume: the checkpoint does not hold what this run trains: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]} (were method.targets or the method changed?); resume with the "
                "method settings it was written with, or start afresh (even --force-resume cannot continue from it)")
        own = self.trainable_state_dict(components)
        wrong = [k for k in sorted(own) if tuple(own[k].shape) != tuple(state[k].shape)]
        if wrong:
            k = wrong[0]
            raise DifftuneError(f"train.resume: the checkpoint's tensors do not fit this run ({len(wrong)} differ, e.g. "
                                f"{k}: {tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} here; was "
                                "method.rank changed?); even --force-resume cannot continue across a change of shapes")

    def copy_parameters(self, components: Components, state: dict[str, torch.Tensor],
                        skip_prefix: str | None = None) -> None:
        """Copy ``role.parameter_name`` tensors into the trainable modules (keys under ``skip_prefix`` are not)."""
        modules = self.trainable_modules(components)
        with torch.no_grad():
            for key, value in state.items():
                if skip_prefix is None or not key.startswith(skip_prefix):
                    role, name = key.split(".", 1)
                    modules[role].get_parameter(name).copy_(value)

    @abstractmethod
    def export(self, components: Components, out_dir: Path, metadata: dict[str, str]) -> list[Path]:
        """Write the result into ``out_dir``; return the files written."""

    def card_details(self) -> dict[str, Any]:
        """Facts for the model card: a ``summary`` table and a ``usage`` code snippet (:meth:`usage_code`)."""
        return {}

    def usage_code(self, load: str = "", prompt: str = "{prompt}", model: str = "{base_model}", after: str = "") -> str:
        """Python that loads ``model`` into the family's pipeline, runs ``load`` (lines that load this run's
        result into ``pipe``) and makes an image of ``prompt``; ``after``: lines at the end.

        ``{base_model}``, ``{repo_or_folder}`` and ``{prompt}`` are filled in when the card is written.
        """
        pipe = self.family.pipeline_class().__name__
        return ("import torch\n"
                f"from diffusers import {pipe}\n\n"
                f'pipe = {pipe}.from_pretrained("{model}", torch_dtype=torch.float16).to("cuda")\n'
                + load + f'image = pipe("{prompt}").images[0]\n' + after)

    # --- hooks the loop calls; the defaults do nothing ----------------------------------------

    def prepare_batch(self, batch: Batch) -> Batch:
        """Adjust a collated batch before the loss (e.g. write placeholder tokens into captions).

        Random choices must use the torch RNG, which the loop seeds per step.
        """
        return batch

    def on_autocast(self, train_view: Components) -> None:
        """Called once when training runs under autocast; ``train_view`` holds the modules the step runs."""
        return None

    def on_step_end(self, step: int, components: Components) -> None:
        """Called after each optimizer step; ``step`` counts the steps completed so far."""
        return None
