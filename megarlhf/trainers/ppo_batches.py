"""How PPO's rollout batch is laid out and cut into microbatches. Layer: trainers/.

A rollout batch is a dict of whole-batch tensors, the same on every rank (see
parallel/collect.py): tokens / mask [N, T] (prompt, response, padding; mask = response
tokens), prompt / response lengths, the last token's index, EOS flags. Each role then cuts
its data-parallel share into microbatches; this module does the cutting, so that the
trainer reads as the algorithm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from megarlhf.data import collate_sft
from megarlhf.parallel import RoleGroups
from megarlhf.parallel.collect import shard_rows

Batch = dict[str, torch.Tensor]


def rollout_batch(
    tokens: torch.Tensor, mask: torch.Tensor, prompt_lengths: torch.Tensor, *,
    eos_id: int | Sequence[int], pad_id: int, multiple: int, max_seq_length: int,
) -> Batch:  # fmt: skip
    """tokens [N, T] and the response mask -> the batch PPO works on: lengths, last-token
    index, EOS flags (a row ending in any of the EOS ids finished); columns trimmed to the
    longest row rounded up to `multiple`."""
    response_lengths = mask.sum(1).long()
    lengths = prompt_lengths + response_lengths
    last = lengths - 1
    eos_ids = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=tokens.device)
    finished = torch.isin(tokens.gather(1, last.unsqueeze(1)).squeeze(1), eos_ids)
    t = -(-int(lengths.max()) // multiple) * multiple
    if t > max_seq_length:
        t = int(lengths.max())
    if t > tokens.shape[1]:
        tokens = F.pad(tokens, (0, t - tokens.shape[1]), value=pad_id)
        mask = F.pad(mask, (0, t - mask.shape[1]))
    return {
        "tokens": tokens[:, :t].contiguous(),
        "mask": mask[:, :t].contiguous(),
        "prompt_lengths": prompt_lengths,
        "response_lengths": response_lengths,
        "lengths": lengths,
        "last_index": last,
        "finished": finished,
    }


def cut_microbatches(
    batch: Batch, rows: list[int], extra: dict[str, torch.Tensor], *, micro_batch_size: int,
    pipelined: bool, multiple: int, pad_id: int, device, min_length: int = 0,
) -> list[Batch]:  # fmt: skip
    """One DP rank's `rows` -> microbatches of micro_batch_size, each cut to the columns it
    uses (no compute on padding beyond each microbatch's longest row).

    Without pipeline parallelism rows are grouped by length (longest first), so each
    microbatch is about as short as it can be; the sums over rows, and so the gradients,
    are unchanged. Pipeline stages exchange fixed-size activations, so when `pipelined`
    every microbatch keeps the step's longest length (at least `min_length`). `slot` =
    each row's position in `rows`, to put outputs back in order. `extra` holds more
    [N, T] / [N] tensors to cut the same way.
    """
    lengths = batch["lengths"][rows].tolist()
    full_t = batch["tokens"].shape[1]
    order = list(range(len(rows)))
    if not pipelined:
        order.sort(key=lambda i: -lengths[i])
    out = []
    for k in range(0, len(order), micro_batch_size):
        slots = order[k : k + micro_batch_size]
        longest = max(max(lengths), min_length) if pipelined else max(lengths[i] for i in slots)
        t = -(-longest // multiple) * multiple
        if t > full_t and longest <= full_t:
            t = full_t
        idx = torch.tensor([rows[i] for i in slots])
        per_row = {"last_index": batch["last_index"], **extra}

        def cols(v, pad=0):
            v = v[idx, :t]
            return F.pad(v, (0, t - v.shape[1]), value=pad) if v.shape[1] < t else v

        mb = {
            "tokens": cols(batch["tokens"], pad_id),
            "position_ids": torch.arange(t).expand(len(idx), t).contiguous(),
            "mask": cols(batch["mask"]),
            **{name: (cols(v) if v.dim() == 2 else v[idx]) for name, v in per_row.items()},
            "slot": torch.tensor(slots),
        }
        out.append({name: v.to(device) for name, v in mb.items()})
    return out


def ptx_microbatches(
    items: list[dict], groups: RoleGroups, *, micro_batch_size: int, pad_id: int, device, length: int | None
) -> tuple[list[Batch], torch.Tensor]:
    """A ptx batch of SFT items (the same on every rank) -> this DP rank's microbatches
    ("ptx_mask" marks the SFT targets) and the global number of SFT target tokens.
    `length` forces one length on every microbatch (pipeline parallelism); None = each
    microbatch its longest row."""
    n_ptx = torch.stack([it["loss_mask"].sum() for it in items]).sum().clamp(min=1).to(device)
    mine = [items[i] for i in shard_rows(len(items), groups)]
    out = []
    for k in range(0, len(mine), micro_batch_size):
        chunk = mine[k : k + micro_batch_size]
        mb = collate_sft(chunk, length or max(len(it["input_ids"]) for it in chunk), pad_id)
        mb = {"tokens": mb["tokens"], "position_ids": mb["position_ids"], "ptx_mask": mb["loss_mask"]}
        out.append({name: v.to(device) for name, v in mb.items()})
    return out, n_ptx
