"""Distributed set-up: launch env, CPU platform layer, role layouts and groups, weights.

Layer: parallel/. The only package that touches Megatron-Core's `parallel_state`,
`HyperCommGrid` or `new_group`; everything else receives groups from a ParallelContext.
"""

# Megatron-Core's TE/Apex fallback warnings are filtered for every entry point in
# megarlhf/output.py (imported with the package).
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
