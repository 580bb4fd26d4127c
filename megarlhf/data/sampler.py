"""Deterministic, resumable sampler sharded over data-parallel ranks.

Layer: data/ (imports torch and megarlhf.config only; no torch.distributed: ranks are
passed in as integers).

Every rank computes the same global order (epoch e is a permutation seeded with seed + e)
and takes its contiguous chunk of each global batch, so no communication is needed and
the union over ranks of a global batch is exactly the single-rank global batch. The state
is global (epoch, samples consumed in it), so a run can resume at another dp_size.
"""

from __future__ import annotations

import torch

from megarlhf.config.errors import ConfigError


class ShardedSampler:
    """Yields this rank's indices of successive global batches, epoch after epoch."""

    def __init__(
        self, num_samples: int, global_batch_size: int, dp_rank: int, dp_size: int, seed: int,
        shuffle: bool = True, drop_last: bool = True,
    ):  # fmt: skip
        if num_samples < 1:
            raise ConfigError(f"the dataset is empty (num_samples={num_samples})")
        if dp_size < 1:
            raise ConfigError(f"dp_size={dp_size}; expected >= 1")
        if global_batch_size < 1 or global_batch_size % dp_size != 0:
            raise ConfigError(
                f"global_batch_size={global_batch_size} must be a positive multiple of the "
                f"data-parallel size {dp_size} (each rank takes an equal share)"
            )
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if drop_last and num_samples < global_batch_size:
            raise ConfigError(
                f"global_batch_size={global_batch_size} exceeds the dataset's {num_samples} samples; "
                "with drop_last no batch would ever be produced: lower the batch size or add data"
            )
        self.num_samples, self.global_batch_size, self.seed = num_samples, global_batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0
        self.consumed_in_epoch = 0  # samples of this epoch's order handed out, over all ranks
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, order) cache

    @property
    def batches_per_epoch(self) -> int:
        full, tail = divmod(self.num_samples, self.global_batch_size)
        return full if self.drop_last or tail == 0 else full + 1

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The sample order of `epoch` ([num_samples], Long), identical on every rank."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_samples, generator=g)
            else:
                order = torch.arange(self.num_samples)
            self._order = (epoch, order)
        return self._order[1]

    def next_batch(self) -> list[int]:
        """This rank's share (chunk dp_rank) of the next global batch."""
        if self.consumed_in_epoch >= self.batches_per_epoch * self.global_batch_size:
            self.epoch += 1
            self.consumed_in_epoch = 0
        order = self.epoch_order(self.epoch)
        start = self.consumed_in_epoch
        idx = torch.arange(start, start + self.global_batch_size)
        # drop_last=False: the last, short batch is completed from the start of the same
        # epoch's order, so every rank still gets an equal share (collectives need that).
        batch = order[idx % self.num_samples]
        self.consumed_in_epoch += self.global_batch_size
        per_rank = self.global_batch_size // self.dp_size
        return batch[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank].tolist()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "consumed_in_epoch": self.consumed_in_epoch, "seed": self.seed,
            "num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle, "drop_last": self.drop_last,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` stopped. The order must be the one that was saved:
        a different seed, dataset size or batch size would silently change the data seen."""
        for key in ("seed", "num_samples", "global_batch_size", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ConfigError(
                    f"sampler checkpoint has {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                    "resume with the same data and batch settings, or start a new run"
                )
        self.epoch = state["epoch"]
        self.consumed_in_epoch = state["consumed_in_epoch"]
