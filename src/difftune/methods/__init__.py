"""Fine-tuning methods. Adding one is a new module here plus one registration line below."""

from difftune.methods.base import Method
from difftune.methods.lora import LoRA
from difftune.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")

METHODS.register("lora")(LoRA)

__all__ = ["METHODS", "Method"]
