"""Seeding. Layer: parallel/.

Megatron-Core keeps three RNG streams: the default one (same on all TP ranks: dropout in
replicated regions), a model-parallel one (seed + 2718 + tp_rank: dropout inside TP
regions) and an expert one. `seed_all` sets them from one seed for a given TP rank.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from megarlhf.parallel.layout import RoleGroups


def seed_all(seed: int, groups: RoleGroups | None = None) -> None:
    """Seed python, numpy, torch and Megatron's model-parallel RNG tracker.

    Every rank must use the same `seed`: with CPU initialisation weights are drawn from
    the default generator, so replicated parameters are only equal if it is.
    """
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tp_rank = 0 if groups is None else groups.tp_rank
    model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
