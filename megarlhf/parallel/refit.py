"""Weight refit: keep the generation engine's copy of the actor in sync after updates.

Layer: parallel/. When the engine generates on the actor itself (same TP-only layout)
there is nothing to do: the engine reads the parameters in place. When layouts differ
(e.g. a TP2xPP2 actor generating through a TP2 copy on the same ranks, like
NeMo-Aligner's reshard), Megatron-Core's resharding planner computes which slice of
which parameter each rank sends where, once, and every refit replays that plan with
point-to-point copies (NCCL on GPU, gloo on CPU). Gradients and optimizer state never
move: only parameters are sources.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megarlhf.parallel import compat
from megarlhf.parallel.layout import RoleGroups


class WeightRefit:
    """`refit()` copies the actor's current parameters into the engine's model."""

    def __init__(self, actor: torch.nn.Module, actor_groups: RoleGroups, engine: torch.nn.Module, engine_groups: RoleGroups):
        self.actor, self.engine = actor, engine
        self.in_place = actor is engine
        self.actor_layout, self.engine_layout = actor_groups.layout, engine_groups.layout
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.last_seconds = 0.0
        if not self.in_place:
            compat.forget_refit_plans()  # a plan cached for earlier models of these layout sizes

    @torch.no_grad()
    def refit(self) -> float:
        """Collective over all ranks. Returns the seconds it took (0 when in place)."""
        if self.in_place:
            self.last_seconds = 0.0
            return 0.0
        from megatron.core.resharding import swap_model_weights

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        swap_model_weights(self.actor, self.engine, self.backend)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        self.last_seconds = time.perf_counter() - t0
        return self.last_seconds

    def __repr__(self) -> str:
        how = "in place" if self.in_place else f"{self.actor_layout} -> {self.engine_layout} ({self.backend})"
        return f"WeightRefit({how})"
