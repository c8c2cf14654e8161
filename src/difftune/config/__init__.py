"""Typed, strict run configuration: the schema, TOML in and out, and every check that needs only the config.

This package imports nothing else from difftune (apart from its errors): the rest depends on it.
:func:`difftune.load_config` adds the checks against what is registered (families, methods).
"""

from difftune.config.loader import config_to_dict, dump_toml, flat_config, parse_config
from difftune.config.schema import Config

__all__ = ["Config", "config_to_dict", "dump_toml", "flat_config", "parse_config"]
