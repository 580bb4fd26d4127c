"""Worker-side helpers shared by the parallel tests (run inside harness ranks)."""

from __future__ import annotations

import torch

from megarlhf.config import ModelConfig
from megarlhf.parallel import Layout, seed_all
from megarlhf.parallel.layout import RoleGroups, build_role_groups

_GROUPS: dict[tuple[int, int], RoleGroups] = {}


def groups(tp: int = 1, pp: int = 1) -> RoleGroups:
    """Groups for a layout, created once per worker (creation is collective: every rank
    calls this in the same order because every rank runs the same test function)."""
    key = (tp, pp)
    if key not in _GROUPS:
        _GROUPS[key] = build_role_groups(Layout(tp, pp))
    return _GROUPS[key]


def tiny_config(arch: str = "llama", **overrides) -> ModelConfig:
    base = dict(
        arch=arch, num_layers=2, hidden_size=64, num_attention_heads=4,
        num_query_groups=2 if arch == "llama" else None, ffn_hidden_size=128 if arch == "llama" else None,
        vocab_size=250, make_vocab_size_divisible_by=128, max_seq_length=64,
    )  # fmt: skip
    base.update(overrides)
    return ModelConfig(**base)


def batch(b: int = 4, t: int = 16, vocab: int = 250, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic tokens, positions and a ragged loss mask (right padding)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    return {
        "tokens": tokens,
        "position_ids": torch.arange(t).expand(b, t).contiguous(),
        "mask": mask,
    }


def reseed(seed: int, g: RoleGroups) -> None:
    seed_all(seed, g)
