"""Masked statistics, reward shaping and generalised advantage estimation.

Layer: algorithms/ (pure torch; no config objects, no process groups, no host syncs).

Conventions. Tensors are [B, T] and aligned to token position: index t holds the quantity
for token t (its reward, its value V(s_t) of the state before token t was generated).
`mask` is float, 1 on response tokens; a row's response tokens are contiguous (prompt
before them, padding after). Everything returned is zero outside the mask, and values
outside it are never read, so padding may hold garbage (even inf or nan).

The masked statistics here reduce over the tensors they are given, i.e. one rank's
batch; for statistics over a data-parallel batch, gather first.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x * mask) over all elements, 0-d. Ignores x outside the mask even if non-finite."""
    return torch.where(mask.bool(), x * mask, 0).sum()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x * mask) / sum(mask), 0-d. nan for an empty mask."""
    return masked_sum(x, mask) / mask.sum()


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked elements, 0-d.

    unbiased: Bessel's correction n / (n - 1) with n = sum(mask), as in TRL's masked_var
    (inf or nan when n <= 1; TRL raises there, which would need a host sync).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked elements; zero outside the mask.

    var is unbiased. shift_mean=False adds the mean back (TRL's masked_whiten): the
    result has the original mean and unit variance.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last response token of each row, [B, T] -> LongTensor [B].

    Raises ValueError for a row with no response token; the check is a host sync.
    """
    positions = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).amax(dim=-1)
    if bool((last < 0).any()):
        rows = (last < 0).nonzero().flatten().tolist()
        raise ValueError(
            f"rows {rows} have an empty response mask; drop them or generate at least one token"
        )
    return last


def shape_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards for PPO (Ziegler et al. 2019): r_t = -kl_coef * kl_t + score * [t last].

    scores: [B] sequence scores (reward model, already normalised/clipped if wanted).
    kl: [B, T] per-token KL estimate (`kl_penalty`), unmasked.
    Returns rewards [B, T], zero outside the mask. ValueError if a row's mask is empty.
    """
    last = last_token_index(mask)
    rewards = torch.where(mask.bool(), -kl_coef * kl, 0)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), [B, T] -> (advantages, returns).

        delta_t = r_t + gamma * V_{t+1} - V_t,    V after the last response token = 0
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                       (the value target)

    Both outputs are zero outside the mask and carry no gradient. The loop runs backwards
    over all T positions for the whole batch at once; zeroing V and A outside the mask
    makes each row's recursion start fresh at its last response token.
    """
    live = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(live[:, t], delta + gamma * lam * next_advantage, 0)
        advantages[:, t] = advantage
        next_value = torch.where(live[:, t], values[:, t], 0)
        next_advantage = advantage
    returns = torch.where(live, advantages + values, 0)
    return advantages, returns
