"""Errors a user can act on. Layer: config/ (bottom; imports nothing from megarlhf)."""


class ConfigError(ValueError):
    """A bad configuration value. The message names the field and what to do.

    The CLI turns it into exit code 2.
    """


class DataError(ValueError):
    """A bad data file. The message names `file:line` and what was wrong (exit code 2)."""


class TrainingDiverged(RuntimeError):
    """Training produced non-finite losses, gradients or weights past the allowed skips.

    The message names the first bad step and the last finite checkpoint (exit code 4).
    """
