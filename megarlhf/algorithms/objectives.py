"""Policy objectives: PPO's clip and its 2025 successors GSPO, GSPO-token, CISPO, SAPO.

Layer: algorithms/ (pure torch; no config objects, no process groups, no host syncs).

Every objective has `policy_loss`'s contract (losses.py): [B, T] inputs aligned to token
position, a float `mask`, the *global* `num_tokens` (and `num_sequences` for
aggregation="sequence") as arguments, optional detached per-token `weights` (the rollout
correction's importance weights) multiplying loss_t before the aggregation, and a return
value (loss, stats) with the same stat keys (policy/pg_loss, policy/clipfrac,
policy/approxkl, policy/ratio), so a trainer swaps one for another through the table

    POLICY_OBJECTIVES = {"ppo", "gspo", "gspo_token", "cispo", "sapo"}

Each takes its own knobs as keywords: the clip family (ppo, gspo, gspo_token, cispo)
`cliprange_low`, `cliprange_high`; sapo `temperature_pos`, `temperature_neg`.

With r_t = exp(logprobs_t - old_logprobs_t) and A the advantages:

    ppo         max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high))      (Schulman 2017)
    gspo        s_i = exp(mean_t log r_t) per sequence, the same clip on s_i with the
                sequence's advantage; one term per sequence  (Zheng et al. 2025)
    gspo_token  s_it = sg[s_i] * r_t / sg[r_t]: the value of s_i, the gradient of a token
                term, for token-level advantages (GSPO paper, sec. 4.3)
    cispo       -sg[clip(r_t, 1 - eps_low, 1 + eps_high)] * A * logprobs_t: the clipped
                ratio is a detached weight, so no token's gradient is dropped
                (MiniMax-M1, MiniMax 2025)
    sapo        -A * (4 / tau) * sigmoid(tau (r_t - 1)), tau = tau_pos if A > 0 else
                tau_neg: a smooth gate in place of the hard clip (Gao et al. 2025, SAPO)

The papers' aggregations: GSPO and SAPO average over each response's tokens, then over
responses (aggregation="sequence"); CISPO and DAPO sum over all tokens / their number
("token"). The trainer's `loss_aggregation` picks one for any objective.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from megarlhf.algorithms.losses import (
    _AGGREGATORS,
    _check_aggregation,
    _check_num_tokens,
    _token_mean,
    apply_weights,
    policy_loss,
)

# exp() of a sequence's mean log-ratio above this would overflow float32 for nothing: the
# clip has long taken over (verl clamps at the same value).
_MAX_SEQUENCE_LOG_RATIO = 10.0


def _stats(loss: Tensor, clipped: Tensor, log_ratio: Tensor, ratio: Tensor, mask: Tensor, num_tokens) -> dict[str, Tensor]:
    """The objectives' common stats: the loss, then token means over num_tokens."""
    with torch.no_grad():
        return {
            "policy/pg_loss": loss.detach(),
            "policy/clipfrac": _token_mean(clipped.to(mask.dtype), mask, num_tokens),
            "policy/approxkl": _token_mean(0.5 * log_ratio.square(), mask, num_tokens),
            "policy/ratio": _token_mean(ratio.detach(), mask, num_tokens),
        }


def _prologue(logprobs, old_logprobs, mask, num_tokens, aggregation, num_sequences) -> Tensor:
    """Checks the counts and returns the log-ratio, zeroed outside the mask (a padding
    log-ratio may overflow exp(), and inf * 0 would make the gradient nan)."""
    _check_num_tokens(num_tokens)
    _check_aggregation(aggregation, num_sequences)
    return torch.where(mask.bool(), logprobs - old_logprobs, 0)


def _row_mean(x: Tensor, mask: Tensor) -> Tensor:
    """[B, T] -> [B]: mean over each row's masked tokens, 0 for an empty row."""
    return torch.where(mask.bool(), x, 0).sum(-1) / mask.sum(-1).clamp(min=1)


def ppo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, num_tokens: float | Tensor, *,
    cliprange_low: float, cliprange_high: float, aggregation: str = "token",
    num_sequences: float | Tensor | None = None, weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """`losses.policy_loss` with the table's keyword interface."""
    return policy_loss(
        logprobs, old_logprobs, advantages, mask, cliprange_low, num_tokens, cliprange_low=cliprange_low,
        cliprange_high=cliprange_high, aggregation=aggregation, num_sequences=num_sequences, weights=weights,
    )  # fmt: skip


def gspo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, num_tokens: float | Tensor, *,
    cliprange_low: float, cliprange_high: float, aggregation: str = "token",
    num_sequences: float | Tensor | None = None, weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """GSPO (Zheng et al. 2025): one clipped term per sequence, [B, T] -> 0-d.

        s_i    = exp((1 / |y_i|) sum_t (logprobs_it - old_logprobs_it))    length-normalised
        A_i    = mean of advantages_it over the row's tokens (the sequence's advantage: GRPO
                 spreads one value over the row, so this is that value)
        loss_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high))
        loss   = aggregate(loss_i on every token of row i)    "sequence": sum_i loss_i / num_sequences

    The paper's clip range is ~1e3 times narrower than PPO's (eps 3e-4 / 4e-4), s_i being a
    per-token geometric mean. An all-masked row contributes nothing. stats: clipfrac and
    ratio count each sequence's s_i on its tokens (token means over num_tokens).
    """
    log_ratio = _prologue(logprobs, old_logprobs, mask, num_tokens, aggregation, num_sequences)
    seq_log_ratio = _row_mean(log_ratio, mask).clamp(max=_MAX_SEQUENCE_LOG_RATIO)  # [B]
    s = seq_log_ratio.exp()
    adv = _row_mean(advantages, mask)  # [B]
    unclipped = -adv * s
    clipped = -adv * s.clamp(1.0 - cliprange_low, 1.0 + cliprange_high)
    loss_t = apply_weights(torch.maximum(unclipped, clipped).unsqueeze(-1).expand_as(mask), weights)
    loss = _AGGREGATORS[aggregation](loss_t, mask, num_tokens, num_sequences)
    was_clipped = (clipped > unclipped).unsqueeze(-1).expand_as(mask)
    return loss, _stats(loss, was_clipped, log_ratio, s.unsqueeze(-1).expand_as(mask), mask, num_tokens)


def gspo_token_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, num_tokens: float | Tensor, *,
    cliprange_low: float, cliprange_high: float, aggregation: str = "token",
    num_sequences: float | Tensor | None = None, weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """GSPO-token (GSPO paper, sec. 4.3): token advantages on the sequence ratio, [B, T] -> 0-d.

        s_it   = sg[s_i] * exp(logprobs_it - sg[logprobs_it])     (value s_i, gradient of r_t)
        loss_t = max(-A_it s_it, -A_it clip(s_it, 1 - eps_low, 1 + eps_high))
        loss   = aggregate(loss_t)

    With one advantage per sequence its gradient equals `gspo_loss`'s (the paper's point,
    tested): d s_it = s_i d logprobs_it, summed over the row's tokens = |y_i| d s_i.
    """
    log_ratio = _prologue(logprobs, old_logprobs, mask, num_tokens, aggregation, num_sequences)
    seq_log_ratio = _row_mean(log_ratio, mask).clamp(max=_MAX_SEQUENCE_LOG_RATIO).detach()  # [B]
    live_logprobs = torch.where(mask.bool(), logprobs, 0)
    s = (seq_log_ratio.unsqueeze(-1) + live_logprobs - live_logprobs.detach()).exp()  # [B, T]
    unclipped = -advantages * s
    clipped = -advantages * s.clamp(1.0 - cliprange_low, 1.0 + cliprange_high)
    loss_t = apply_weights(torch.maximum(unclipped, clipped), weights)
    loss = _AGGREGATORS[aggregation](loss_t, mask, num_tokens, num_sequences)
    return loss, _stats(loss, clipped > unclipped, log_ratio, s, mask, num_tokens)


def cispo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, num_tokens: float | Tensor, *,
    cliprange_low: float, cliprange_high: float, aggregation: str = "token",
    num_sequences: float | Tensor | None = None, weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """CISPO (MiniMax-M1, MiniMax 2025): a clipped, detached IS weight on
    REINFORCE, [B, T] -> 0-d.

        w_t    = sg[clip(r_t, 1 - eps_low, 1 + eps_high)]
        loss_t = -w_t * A_t * logprobs_t
        loss   = aggregate(loss_t)        (the paper: "token", over all tokens of the batch)

    Unlike PPO's clip, a token whose ratio left the range keeps its gradient (scaled by the
    bound). The paper bounds only from above (eps_low large: 1 - eps_low <= 0 is no lower
    bound); TRL's `epsilon_high=5.0` (an absolute cap) is cliprange_high = 4.0 here.
    The loss's *value* is a REINFORCE surrogate, not a ratio objective: compare its
    gradient, not its level, across objectives. stats: clipfrac = fraction of tokens whose
    ratio was outside the range.
    """
    log_ratio = _prologue(logprobs, old_logprobs, mask, num_tokens, aggregation, num_sequences)
    ratio = log_ratio.exp()
    weight = ratio.clamp(1.0 - cliprange_low, 1.0 + cliprange_high).detach()
    loss_t = apply_weights(-weight * advantages * torch.where(mask.bool(), logprobs, 0), weights)
    loss = _AGGREGATORS[aggregation](loss_t, mask, num_tokens, num_sequences)
    was_clipped = (ratio < 1.0 - cliprange_low) | (ratio > 1.0 + cliprange_high)
    return loss, _stats(loss, was_clipped, log_ratio, ratio, mask, num_tokens)


def sapo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, num_tokens: float | Tensor, *,
    temperature_pos: float, temperature_neg: float, aggregation: str = "token",
    num_sequences: float | Tensor | None = None, weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization"): a soft gate instead of
    the hard clip, [B, T] -> 0-d.

        tau_t  = temperature_pos if A_t > 0 else temperature_neg
        f_t    = (4 / tau_t) * sigmoid(tau_t * (r_t - 1))
        loss_t = -f_t * A_t
        loss   = aggregate(loss_t)          (the paper: "sequence")

    d f_t = 4 sigmoid(.)(1 - sigmoid(.)) r_t d logprobs_t: at r_t = 1 exactly the policy
    gradient, fading smoothly as r_t leaves 1 (faster for larger tau; the paper and TRL
    use tau_neg 1.05 > tau_pos 1.0, since negative-advantage tokens destabilise more).
    stats: clipfrac = fraction of tokens whose gate passes less than half the gradient
    (4 sigmoid (1 - sigmoid) < 1/2), SAPO's analogue of a clipped token.
    """
    if temperature_pos <= 0 or temperature_neg <= 0:
        raise ValueError(f"SAPO temperatures must be > 0, got {temperature_pos}, {temperature_neg}")
    log_ratio = _prologue(logprobs, old_logprobs, mask, num_tokens, aggregation, num_sequences)
    ratio = log_ratio.exp()
    tau = torch.where(advantages > 0, ratio.new_tensor(temperature_pos), ratio.new_tensor(temperature_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0))
    loss_t = apply_weights(-(4.0 / tau) * gate * advantages, weights)
    loss = _AGGREGATORS[aggregation](loss_t, mask, num_tokens, num_sequences)
    faded = 4.0 * gate * (1.0 - gate) < 0.5
    return loss, _stats(loss, faded, log_ratio, ratio, mask, num_tokens)


# name -> objective; each (logprobs, old_logprobs, advantages, mask, num_tokens, *,
# <its knobs>, aggregation, num_sequences, weights) -> (loss, stats).
POLICY_OBJECTIVES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "ppo": ppo_loss,
    "gspo": gspo_loss,
    "gspo_token": gspo_token_loss,
    "cispo": cispo_loss,
    "sapo": sapo_loss,
}

# The objectives whose knobs are a clip range (cliprange_low / cliprange_high); sapo's are
# its two temperatures.
CLIP_OBJECTIVES = ("ppo", "gspo", "gspo_token", "cispo")

# Those that need one advantage per sequence (PPO's GAE gives one per token).
SEQUENCE_ADVANTAGE_OBJECTIVES = ("gspo",)
