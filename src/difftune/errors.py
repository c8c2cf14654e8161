"""Exceptions whose message is meant for the person running difftune."""


class DifftuneError(Exception):
    """An error with a message that says what happened and what to do. Exit status 1."""

    exit_code = 1


class ConfigError(DifftuneError):
    """A config problem found before any weights load. Exit status 2."""

    exit_code = 2
