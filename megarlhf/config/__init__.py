"""Configuration dataclasses. Layer: config/ (bottom: imports nothing else from megarlhf)."""

from megarlhf.config.errors import ConfigError, DataError
from megarlhf.config.loader import describe, dump_yaml, load_config
from megarlhf.config.model import ModelConfig
from megarlhf.config.generate import GenerateConfig
from megarlhf.config.grpo import GRPOAlgoConfig, GRPOConfig
from megarlhf.config.ppo import GenerationConfig, PPOAlgoConfig, PPOConfig, RoleLayoutConfig, RolloutConfig
from megarlhf.config.stages import DPOConfig, RMConfig, SFTConfig
from megarlhf.config.train import DataConfig, LayoutConfig, OptimConfig, RunConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "DPOConfig",
    "DataError",
    "GenerateConfig",
    "GenerationConfig",
    "GRPOAlgoConfig",
    "GRPOConfig",
    "LayoutConfig",
    "ModelConfig",
    "OptimConfig",
    "PPOAlgoConfig",
    "PPOConfig",
    "RMConfig",
    "RoleLayoutConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "describe",
    "dump_yaml",
    "load_config",
]
