"""difftune: fine-tune text-to-image diffusion models on your own images.

The Python API is three names: ``load_config`` (a TOML file or a mapping, checked like
``difftune validate``), ``Config`` (what it returns) and ``train`` (run it). Importing difftune is
cheap; torch and diffusers load when training starts.
"""

from difftune.version import __version__


def __getattr__(name: str):
    if name == "load_config":
        from difftune.run_config import load_config

        return load_config
    if name == "Config":
        from difftune.config.schema import Config

        return Config
    if name == "train":
        from difftune.training.loop import train

        return train
    raise AttributeError(f"module 'difftune' has no attribute {name!r}")


__all__ = ["Config", "__version__", "load_config", "train"]
