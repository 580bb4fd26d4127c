"""Critic-free advantage estimators: group-relative (GRPO, Dr. GRPO, RLOO) and REINFORCE++.

Layer: algorithms/ (pure torch; no config objects, no process groups, no host syncs).

Group layout. Sequence scores are [B] with B = num_prompts * num_generations, the
`num_generations` samples of one prompt on consecutive rows (TRL's GRPOTrainer layout;
note TRL's RLOOTrainer interleaves prompts instead). A group must not be split across
data-parallel ranks or microbatches when these functions run: call them on whole groups
(e.g. on the gathered scores), then scatter the advantages.

Group estimators return one advantage per sequence, [B]; `broadcast_to_tokens` spreads it
over the response tokens for `policy_loss`. Nothing here carries gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from megarlhf.algorithms.advantages import masked_mean


def _groups(scores: Tensor, num_generations: int) -> Tensor:
    """[B] -> [num_prompts, num_generations], checking the layout (shapes only, no sync)."""
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if scores.dim() != 1 or scores.numel() % num_generations:
        raise ValueError(
            f"scores must be 1-D with a length divisible by num_generations={num_generations} "
            f"(whole groups of consecutive rows), got shape {tuple(scores.shape)}"
        )
    return scores.view(-1, num_generations)


@torch.no_grad()
def grpo_advantages(
    scores: Tensor, num_generations: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-normalised advantages (GRPO, Shao et al. 2024, section 4.1.2), [B] -> [B].

        A_i = (s_i - mean_g(s)) / (std_g(s) + eps)     scale_by_std=True  (GRPO)
        A_i =  s_i - mean_g(s)                         scale_by_std=False (Dr. GRPO)

    mean_g / std_g over the sample's own group. std is the *unbiased* (Bessel-corrected,
    n - 1) group std, as in TRL's GRPOTrainer and verl (`torch.std`); the paper does not
    say. Dr. GRPO (Liu et al. 2025) drops the division, which otherwise up-weights groups
    of nearly equal rewards.

    Edge cases: a group of identical scores gives 0 (std = 0, numerator 0, no nan); a
    group of one sample (num_generations=1) gives 0, its own mean being its baseline (verl
    instead falls back to the raw score there).
    """
    grouped = _groups(scores, num_generations)  # [P, G]
    if num_generations == 1:
        return torch.zeros_like(scores)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: Tensor, num_generations: int) -> Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024), [B] -> [B].

        A_i = s_i - (1 / (G - 1)) * sum_{j != i} s_j  =  G / (G - 1) * (s_i - mean_g(s))

    The baseline of each sample is the mean of the other samples of its group, so it is
    independent of the sample and the estimate stays unbiased. A group of one sample
    has no other sample: its advantage is 0 (no learning signal), not nan.
    """
    grouped = _groups(scores, num_generations)  # [P, G]
    if num_generations == 1:
        return torch.zeros_like(scores)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    return (grouped - baseline).reshape(-1)


def _dr_grpo_advantages(scores: Tensor, num_generations: int) -> Tensor:
    return grpo_advantages(scores, num_generations, scale_by_std=False)


# (scores [B], num_generations) -> advantages [B].
GROUP_ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": _dr_grpo_advantages,
    "rloo": rloo_advantages,
}


@torch.no_grad()
def filter_uniform_groups(scores: Tensor, num_generations: int) -> Tensor:
    """Keep mask of DAPO's dynamic sampling (Yu et al. 2025), [B] -> bool [B].

    False for every row of a group whose scores are all equal (all solved or all failed):
    its group-relative advantages are all 0, so it adds no gradient but dilutes the
    token denominator. Equality is exact, meant for discrete (e.g. 0/1) rewards. A group
    of one sample is always uniform, hence always dropped.

    Selecting the rows with the mask is a host sync (data-dependent shape); do it once
    per batch, before counting `num_tokens` / `num_sequences`.
    """
    grouped = _groups(scores, num_generations)  # [P, G]
    varied = grouped.amax(dim=1) != grouped.amin(dim=1)  # [P]
    return varied.repeat_interleave(num_generations)


def broadcast_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence advantages onto the response tokens, [B], [B, T] -> [B, T], 0 outside."""
    return torch.where(mask.bool(), advantages.unsqueeze(-1), 0).to(advantages.dtype)


@torch.no_grad()
def reinforce_pp_returns(
    scores: Tensor,
    mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
) -> Tensor:
    """KL-shaped returns-to-go of REINFORCE++ (Hu 2025), [B], [B, T] -> [B, T], 0 outside.

        r_t = -kl_coef * kl_t + score * [t is the row's last response token]
        G_t = r_t + gamma * G_{t+1},     G after the last response token = 0

    kl: [B, T] per-token estimate (`kl_penalty`), unmasked; None means no KL shaping.
    A row with an empty mask gets no score and all-zero returns (no error, unlike
    `shape_rewards`). Runs backwards over T for the whole batch; zeroing G outside the
    mask restarts each row's recursion at its last response token (contiguous span).
    """
    live = mask.bool()
    rewards = torch.zeros_like(mask, dtype=scores.dtype)
    if kl is not None:
        rewards = torch.where(live, -kl_coef * kl, 0).to(scores.dtype)
    # The score lands on each row's last response token; rows without one get nothing.
    positions = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    last = torch.where(live, positions, -1).amax(dim=-1)  # [B], -1 for an empty row
    score = torch.where(last >= 0, scores, 0).unsqueeze(1)
    rewards = rewards.scatter_add(1, last.clamp(min=0).unsqueeze(1), score)

    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = torch.where(live[:, t], rewards[:, t] + gamma * running, 0)
        returns[:, t] = running
    return returns


@torch.no_grad()
def reinforce_pp_advantages(
    scores: Tensor,
    mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    eps: float = 1e-8,
    moments: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """REINFORCE++ advantages (Hu 2025): batch-normalised returns, [B], [B, T] -> [B, T].

        G_t = reinforce_pp_returns(scores, mask, kl, kl_coef, gamma)_t     (no critic)
        A_t = (G_t - mean) / sqrt(var + eps)

    mean and the *biased* var are taken over all response tokens of the batch (global
    batch normalisation, as in OpenRLHF), not per prompt: the normalisation replaces
    PPO's critic as the variance reducer. The population should be the global batch;
    under data parallelism compute the returns with `reinforce_pp_returns`, all-reduce
    n = sum(mask), S1 = sum(G * mask), S2 = sum(G^2 * mask), and pass
    moments = (S1 / n, S2 / n - (S1 / n)^2). Without `moments` the batch given is the
    population.

    REINFORCE++-baseline: pass scores already centred per group
    (`grpo_advantages(scores, G, scale_by_std=False)`).

    Rows with an empty mask get all-zero advantages. Returns zero outside the mask.
    """
    returns = reinforce_pp_returns(scores, mask, kl, kl_coef, gamma)
    if moments is None:
        mean = masked_mean(returns, mask)
        var = masked_mean((returns - mean).square(), mask)
    else:
        mean, var = moments
    return torch.where(mask.bool(), (returns - mean) * torch.rsqrt(var + eps), 0)
