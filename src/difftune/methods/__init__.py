"""Fine-tuning methods. Adding one is a new module here plus one registration line below.

A registration says where the method's class lives and what it accepts; importing this package is
cheap (no torch), so ``difftune validate`` checks a method's settings without loading it.
"""

from __future__ import annotations

from difftune.compat import require_working_stack

require_working_stack()  # a known-broken install stops here, saying what to install

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from difftune.methods import rules
from difftune.registry import Registry

if TYPE_CHECKING:
    from difftune.config.schema import MethodConfig
    from difftune.methods.base import Method
    from difftune.models.base import ModelFamily


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its class (``"module:Class"``, imported on first use) and its config rules."""

    location: str
    #: Checks of ``[method]`` for this method (:mod:`difftune.methods.rules`); no weights, no torch.
    check: Callable[[MethodConfig], None] = rules.no_rules
    #: True if DreamBooth prior preservation (class images, prior loss) makes sense with this method.
    supports_prior_preservation: bool = False
    #: The ``[method]`` keys this method reads (besides :data:`rules.COMMON_KEYS`); any other key set away
    #: from its default is refused (:func:`rules.check_keys`).
    keys: tuple[str, ...] = ()
    #: True if the denoiser's own weights train (not an adapter on frozen weights): then they can be
    #: neither quantised (``model.quantize``) nor offloaded (``model.offload``).
    trains_denoiser_weights: bool = False

    def load(self) -> type[Method]:
        module, _, name = self.location.partition(":")
        return getattr(importlib.import_module(module), name)

    def build(self, cfg: MethodConfig, family: ModelFamily) -> Method:
        return self.load()(cfg, family)


METHODS: Registry[MethodSpec] = Registry("method")

METHODS.register("lora")(MethodSpec("difftune.methods.lora:LoRA", rules.check_lora, supports_prior_preservation=True,
                                    keys=rules.LORA_KEYS))
METHODS.register("full")(MethodSpec("difftune.methods.full:FullFineTune", rules.check_full,
                                    supports_prior_preservation=True, keys=rules.FULL_KEYS,
                                    trains_denoiser_weights=True))
METHODS.register("textual_inversion")(MethodSpec("difftune.methods.textual_inversion:TextualInversion",
                                                 rules.check_tokens, keys=rules.TOKEN_KEYS))
METHODS.register("pivotal")(MethodSpec("difftune.methods.pivotal:PivotalTuning", rules.check_pivotal,
                                       keys=rules.PIVOTAL_KEYS))

__all__ = ["METHODS", "MethodSpec"]
