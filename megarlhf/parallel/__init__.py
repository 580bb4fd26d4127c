"""Distributed set-up: launch env, CPU platform layer, role layouts and groups, weights.

Layer: parallel/. The only package that touches Megatron-Core's `parallel_state`,
`HyperCommGrid` or `new_group`; everything else receives groups from a ParallelContext.
"""

import warnings

# Megatron-Core warns once per module when TE/Apex are absent; the fallbacks are what we
# intend to use on CPU and are reported once by `megarlhf.models.backbone` instead.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*absl.logging is not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")

from megarlhf.parallel.distributed import LaunchEnv, detect_launch_env, init_distributed
from megarlhf.parallel.layout import (
    ROLES,
    Layout,
    LayoutError,
    ParallelContext,
    RoleGroups,
    build_parallel_context,
    parallel_state_ranks,
)
from megarlhf.parallel.rng import seed_all

__all__ = [
    "ROLES",
    "LaunchEnv",
    "Layout",
    "LayoutError",
    "ParallelContext",
    "RoleGroups",
    "build_parallel_context",
    "detect_launch_env",
    "init_distributed",
    "parallel_state_ranks",
    "seed_all",
]
