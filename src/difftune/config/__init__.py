"""Typed, strict run configuration."""

from difftune.config.loader import config_to_dict, dump_toml, load_config
from difftune.config.schema import Config

__all__ = ["Config", "config_to_dict", "dump_toml", "load_config"]
