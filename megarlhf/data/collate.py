"""Collation: lists of dataset items -> padded batch tensors the engine consumes.

Layer: data/ (imports torch and megarlhf.config only).

Conventions shared by every batch:
  - sequences are left-aligned and padded on the right to a fixed `seq_length` (one shape
    per run: no recompilation, and pipeline stages agree on tensor shapes);
  - `loss_mask[b, t] = 1` where token t is a training target (predicted from position t-1),
    0 on prompts, markers and padding;
  - padding is found from lengths, never by comparing with `pad_id`: pad may equal EOS.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megarlhf.config.errors import ConfigError


def pad_right(seqs: list[Tensor], length: int, pad_value: float | int) -> Tensor:
    """Stack 1-D tensors into [B, length], each left-aligned, filled with `pad_value`."""
    if not seqs:
        raise ValueError("pad_right: no sequences")
    longest = max(len(s) for s in seqs)
    if longest > length:
        raise ConfigError(
            f"a sequence of {longest} tokens does not fit seq_length={length}; "
            "set the dataset's max_length <= the model's seq_length"
        )
    out = torch.full((len(seqs), length), pad_value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def _positions(batch: int, length: int) -> Tensor:
    return torch.arange(length).expand(batch, length).contiguous()  # [B, S]


def collate_sft(items: list[dict], seq_length: int, pad_id: int) -> dict[str, Tensor]:
    """SFT items -> `{"tokens": Long[B,S], "position_ids": Long[B,S], "loss_mask": Float[B,S]}`."""
    tokens = pad_right([it["input_ids"] for it in items], seq_length, pad_id)
    return {
        "tokens": tokens,
        "position_ids": _positions(len(items), seq_length),
        "loss_mask": pad_right([it["loss_mask"].float() for it in items], seq_length, 0.0),
    }


def collate_preference(items: list[dict], seq_length: int, pad_id: int) -> dict[str, Tensor]:
    """Preference items -> one batch of 2B rows: rows [0, B) chosen, rows [B, 2B) rejected.

    One forward pass scores both sides (same shapes, same microbatch). `last_index[i]` is
    the position of row i's last real token, where a reward model reads its score.
    Returns tokens/position_ids/loss_mask [2B, S] and last_index Long[2B].
    """
    ids = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    masks = [it["chosen_mask"] for it in items] + [it["rejected_mask"] for it in items]
    return {
        "tokens": pad_right(ids, seq_length, pad_id),
        "position_ids": _positions(len(ids), seq_length),
        "loss_mask": pad_right([m.float() for m in masks], seq_length, 0.0),
        "last_index": torch.tensor([len(s) - 1 for s in ids], dtype=torch.long),
    }


def collate_prompts(items: list[dict], pad_id: int) -> dict:
    """Prompt items -> `{"prompt_ids": Long[B, P], "prompt_lengths": Long[B], "answer": list,
    "meta": list}` with P the longest prompt; prompts left-aligned, padded on the right."""
    prompts = [it["prompt_ids"] for it in items]
    return {
        "prompt_ids": pad_right(prompts, max(len(p) for p in prompts), pad_id),
        "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
        "answer": [it["answer"] for it in items],
        "meta": [it["meta"] for it in items],
    }
