"""Errors a user can act on. Layer: config/ (bottom; imports nothing from megarlhf)."""


class ConfigError(ValueError):
    """A bad configuration value. The message names the field and what to do.

    The CLI turns it into exit code 2.
    """


class DataError(ValueError):
    """A bad data file. The message names `file:line` and what was wrong (exit code 2)."""
