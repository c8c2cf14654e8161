"""Fine-tuning methods. Adding one is a new module here plus one registration line below."""

from difftune.compat import require_working_stack

require_working_stack()  # a known-broken install stops here, saying what to install

from difftune.methods.base import Method
from difftune.methods.full import FullFineTune
from difftune.methods.lora import LoRA
from difftune.methods.pivotal import PivotalTuning
from difftune.methods.textual_inversion import TextualInversion
from difftune.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")

METHODS.register("lora")(LoRA)
METHODS.register("full")(FullFineTune)
METHODS.register("textual_inversion")(TextualInversion)
METHODS.register("pivotal")(PivotalTuning)

__all__ = ["METHODS", "Method"]
