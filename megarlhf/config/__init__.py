"""Configuration dataclasses. Layer: config/ (bottom: imports nothing else from megarlhf)."""

from megarlhf.config.errors import ConfigError, DataError
from megarlhf.config.model import ModelConfig

__all__ = ["ConfigError", "DataError", "ModelConfig"]
