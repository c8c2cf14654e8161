"""difftune: fine-tune text-to-image diffusion models on your own images."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Keep `import difftune` light: torch and diffusers load only when the API is used.
    if name in ("load_config", "Config"):
        from difftune import config

        return getattr(config, name)
    if name == "train":
        from difftune.training.loop import train

        return train
    raise AttributeError(name)


__all__ = ["Config", "__version__", "load_config", "train"]
