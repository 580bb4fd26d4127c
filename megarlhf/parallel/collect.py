"""Moving per-sample results between roles whose layouts differ. Layer: parallel/.

In a PPO step the rollout batch is produced by the generation engine's data-parallel
ranks, scored by the reference, reward and critic models at *their* layouts, and trained
on by the actor at its own. Rather than a point-to-point plan per pair of layouts, every
role's result becomes one global `[N, ...]` tensor on every rank: each row is written by
exactly one rank (its owner: the last pipeline stage, tensor-parallel rank 0, of the
data-parallel rank that computed it) and summed over the world. Adding zeros is exact, so
the result is bit-identical to the owner's values, whatever the layouts.

Cost: one all-reduce of N x T numbers per quantity. At 512 sequences x 4096 tokens that is
8 MB in fp32, next to gigabytes of weights moved by the same step; in exchange every rank
holds the whole batch, so advantage whitening and token counts are global without any
further communication, and PPO minibatches can be cut at any layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megarlhf.parallel.layout import RoleGroups


def shard_rows(num_rows: int, groups: RoleGroups) -> range:
    """The rows of an `num_rows`-row global batch that this rank's DP replica handles."""
    if num_rows % groups.layout.dp:
        raise ValueError(f"{num_rows} rows do not split over dp = {groups.layout.dp} ranks")
    per = num_rows // groups.layout.dp
    return range(groups.dp_rank * per, (groups.dp_rank + 1) * per)


def is_row_owner(groups: RoleGroups) -> bool:
    """Whether this rank publishes its DP replica's results (one rank per replica)."""
    return groups.is_last_stage and groups.tp_rank == 0


def gather_rows(
    local: torch.Tensor | None,
    rows: range,
    shape: tuple[int, ...],
    *,
    owner: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Collective over the world: the global tensor of `shape` ([N, ...]) on every rank.

    `local` holds rows `rows` of it on owner ranks (ignored elsewhere). Every row must have
    exactly one owner in the world.
    """
    out = torch.zeros(shape, dtype=dtype, device=device)
    if owner:
        if local is None or local.shape[0] != len(rows):
            got = None if local is None else tuple(local.shape)
            raise ValueError(f"an owner rank must pass {len(rows)} rows, got {got}")
        out[rows.start : rows.stop] = local.to(device=device, dtype=dtype)
    dist.all_reduce(out)
    return out
