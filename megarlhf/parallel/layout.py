"""Role layouts (tp, pp, dp) and the process groups that realise them.

Layer: parallel/. This is the one place that builds process groups. Each role (actor,
critic, reference, reward) gets a `RoleGroups`: a Megatron-Core `ProcessGroupCollection`
built from a `HyperCommGrid` over the same ranks, so two models with different TP/PP
live in one job ("separately sharded"). Roles with equal layouts share groups.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

ROLES = ("actor", "critic", "reference", "reward", "rollout")
"""The four models of PPO, plus the TP-only layout the generation engine runs in."""

# Megatron-Core's default rank order (initialize_model_parallel(order="tp-cp-ep-dp-pp")):
# TP fastest-varying, so TP groups sit on one node; PP slowest, so stages span nodes.
_GRID_DIMS = ["tp", "cp", "ep", "dp", "pp"]


class LayoutError(ValueError):
    """A layout that cannot be realised on this world or model."""


@dataclass(frozen=True)
class Layout:
    """How one model is split over the ranks. dp follows from the world size."""

    tp: int = 1
    """Tensor-parallel size: each layer's matmuls split over this many ranks."""
    pp: int = 1
    """Pipeline-parallel size: the layers split into this many stages."""
    dp: int = 0
    """Data-parallel size; 0 = world_size // (tp * pp), filled in by `resolve`."""

    def __post_init__(self):
        for name in ("tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"layout.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.dp, int) or self.dp < 0:
            raise LayoutError(f"layout.dp must be a non-negative integer (0 = derive), got {self.dp!r}")

    def resolve(self, world_size: int) -> "Layout":
        """Fill in dp from the world size; raise if tp*pp*dp cannot equal it."""
        mp = self.tp * self.pp
        if world_size % mp:
            raise LayoutError(
                f"tp*pp = {self.tp}*{self.pp} = {mp} does not divide the world size {world_size}: "
                f"choose tp and pp whose product divides the number of ranks"
            )
        dp = world_size // mp
        if self.dp and self.dp != dp:
            raise LayoutError(
                f"layout tp={self.tp} pp={self.pp} dp={self.dp} needs {mp * self.dp} ranks, "
                f"the world has {world_size}: set dp=0 to derive it ({dp})"
            )
        return Layout(self.tp, self.pp, dp)

    def check_model(
        self,
        *,
        num_layers: int,
        num_attention_heads: int,
        num_query_groups: int,
        ffn_hidden_size: int,
        hidden_size: int,
    ) -> None:
        """Raise a `LayoutError` naming the field if the model cannot be split this way."""
        checks = [
            (num_attention_heads, self.tp, "num_attention_heads", "tp"),
            (num_query_groups, self.tp, "num_query_groups", "tp"),
            (ffn_hidden_size, self.tp, "ffn_hidden_size", "tp"),
            (hidden_size, self.tp, "hidden_size", "tp"),
            (num_layers, self.pp, "num_layers", "pp"),
        ]
        for value, size, what, dim in checks:
            if value % size:
                raise LayoutError(
                    f"model.{what} = {value} is not divisible by {dim} = {size}: "
                    f"pick a {dim} that divides {value}"
                )

    def __str__(self) -> str:
        return f"tp{self.tp}-pp{self.pp}-dp{self.dp}"


@dataclass
class RoleGroups:
    """The process groups and coordinates of this rank for one layout."""

    layout: Layout
    pgc: object
    """megatron.core.process_groups_config.ProcessGroupCollection for this layout."""
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def tp(self):
        return self.pgc.tp

    @property
    def pp(self):
        return self.pgc.pp

    @property
    def dp(self):
        return self.pgc.dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def length_multiple(self, sequence_parallel: bool) -> int:
        """Sequence lengths at this layout are rounded up to this: 8 on GPU (kernel
        shapes), x TP under sequence parallelism (T is split over TP ranks), 1 otherwise."""
        sp = sequence_parallel and self.layout.tp > 1
        return math.lcm(8 if torch.cuda.is_available() else 1, self.layout.tp if sp else 1)


@contextlib.contextmanager
def parallel_state_ranks(groups: RoleGroups) -> Iterator[None]:
    """Within the block, Megatron-Core's `parallel_state` reports this role's TP and DP
    ranks; its previous answers come back afterwards, also on error.

    megarlhf never initialises parallel_state's global groups (every role has its own
    ProcessGroupCollection), yet Megatron-Core (0.16.1 through 0.19.x; see
    compat.tied_embeddings_rank_context) still asks them for a rank in a few places: building the sharded state of a tied output layer on the last pipeline stage
    (LanguageModule.tie_embeddings_and_output_weights_state_dict) takes the replica id of
    that copy from `get_data_parallel_rank()`, which fails without a DP group. The rank
    overrides parallel_state keeps for such uses (`set_*_rank`) answer it without groups.
    TP comes along because Megatron's other replica ids are (tp rank, dp rank) pairs.
    Process-wide state: use it around one role's calls at a time.
    """
    from megatron.core import parallel_state

    saved = (parallel_state._MPU_TENSOR_MODEL_PARALLEL_RANK, parallel_state._MPU_DATA_PARALLEL_RANK)
    parallel_state.set_tensor_model_parallel_rank(groups.tp_rank)
    parallel_state.set_data_parallel_rank(groups.dp_rank)
    try:
        yield
    finally:
        parallel_state.set_tensor_model_parallel_rank(saved[0])
        parallel_state.set_data_parallel_rank(saved[1])


@dataclass
class ParallelContext:
    """Everything distributed a trainer needs: rank, world, and per-role groups."""

    rank: int
    world_size: int
    roles: dict[str, RoleGroups] = field(default_factory=dict)

    def __getitem__(self, role: str) -> RoleGroups:
        if role not in self.roles:
            raise KeyError(f"no layout for role {role!r}; known roles: {sorted(self.roles)}")
        return self.roles[role]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _subgroups(rank_lists: list[list[int]], backend: str | None):
    """This rank's group among `rank_lists` (every rank calls this, in the same order)."""
    group, _ = dist.new_subgroups_by_enumeration(rank_lists, backend=backend)
    return group


def build_role_groups(layout: Layout, backend: str | None = None) -> RoleGroups:
    """Collective: every rank must call this with the same layout, in the same order."""
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

    world = dist.get_world_size()
    layout = layout.resolve(world)
    grid = HyperCommGrid([layout.tp, 1, 1, layout.dp, layout.pp], _GRID_DIMS, backend=backend)
    tp = grid.create_pg("tp")
    pp = grid.create_pg("pp")
    dp = grid.create_pg("dp")
    mp = grid.create_pg(["tp", "pp"])
    tp_dp = grid.create_pg(["tp", "dp"])
    # The distributed optimizer reduces its grad norm (for clipping) over this group: all
    # ranks of the layout, as Megatron's intra-distributed-optimizer-instance group. Over
    # `dp` alone, TP/PP ranks would each clip by the norm of their own shard only.
    every_rank = dp if layout.tp == layout.pp == 1 else grid.create_pg(["tp", "dp", "pp"])
    single = grid.create_pg("cp")  # size 1: stands in for every absent dimension (cp, ep)

    pp_lists = grid.get_rank_enum("pp")
    # Word embeddings are shared between the first and last stage only when tied; position
    # embeddings live on the first stage only.
    embd = _subgroups([sorted({r[0], r[-1]}) for r in pp_lists], backend) if layout.pp > 1 else pp
    pos_embd = _subgroups([[r[0]] for r in pp_lists], backend) if layout.pp > 1 else pp

    pgc = ProcessGroupCollection(
        tp=tp, pp=pp, mp=mp, embd=embd, pos_embd=pos_embd, cp=single, tp_cp=tp,
        ep=single, expt_tp=tp, tp_ep=tp, tp_ep_pp=mp, tp_dp_cp=tp_dp,
        dp=dp, dp_cp=dp, expt_dp=dp, intra_dp_cp=dp, intra_expt_dp=dp,
        intra_dist_opt=every_rank, inter_dist_opt=None,
    )  # fmt: skip
    return RoleGroups(layout=layout, pgc=pgc, tp_rank=tp.rank(), pp_rank=pp.rank(), dp_rank=dp.rank())


def build_parallel_context(role_layouts: dict[str, Layout]) -> ParallelContext:
    """Groups for every role. Roles with the same (tp, pp) share one set of groups.

    Requires torch.distributed to be initialised (`init_distributed`).
    """
    unknown = set(role_layouts) - set(ROLES)
    if unknown:
        raise LayoutError(f"unknown roles {sorted(unknown)}; expected a subset of {ROLES}")
    world = dist.get_world_size()
    built: dict[tuple[int, int], RoleGroups] = {}
    roles = {}
    for role in ROLES:  # fixed order: group creation is collective
        if role not in role_layouts:
            continue
        layout = role_layouts[role].resolve(world)
        key = (layout.tp, layout.pp)
        if key not in built:
            built[key] = build_role_groups(layout)
        roles[role] = built[key]
    return ParallelContext(rank=dist.get_rank(), world_size=world, roles=roles)
