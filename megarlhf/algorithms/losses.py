"""PPO policy and value losses, entropy bonus and the SFT (PPO-ptx) term.

Layer: algorithms/ (pure torch; no config objects, no process groups, no host syncs).

Inputs are [B, T], aligned to token position, with a float `mask` (1 = response token).
Every loss and statistic is `sum over masked tokens / num_tokens`, where `num_tokens`
is the number of masked tokens in the *global* minibatch (all microbatches on all
data-parallel ranks), counted before the microbatch loop. Summing a loss or a statistic
over microbatches and ranks then gives the global token mean, and the gradient does not
depend on how the minibatch was split. Dividing by a local `mask.sum()` would weight
tokens of short microbatches more.

Two aggregations are offered for `policy_loss` and `kl_loss` (table `LOSS_AGGREGATIONS`):

    "token"     sum_i sum_t loss_it / num_tokens
                Every token weighs the same (DAPO's token-level loss, PPO as in TRL).
                Dr. GRPO's constant normaliser is this with
                num_tokens = num_sequences * max_response_length.
    "sequence"  sum_i (sum_t loss_it / |o_i|) / num_sequences
                Mean over each sequence's own tokens, then over sequences (the GRPO
                paper, eq. 3; verl's "seq-mean-token-mean"): tokens of long responses
                weigh less.

`|o_i|` is the row's own mask sum, which is local by nature; `num_sequences` (like
`num_tokens`) must be the global count over all microbatches and data-parallel ranks.

Each function returns (loss, stats): loss a differentiable 0-d tensor, stats a dict of
detached 0-d tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megarlhf.algorithms.advantages import masked_sum
from megarlhf.algorithms.kl import kl_penalty


def _check_count(name: str, value: float | Tensor, what: str) -> None:
    # Only a Python number is checked: testing a tensor would be a host sync.
    if not isinstance(value, Tensor) and value <= 0:
        raise ValueError(f"{name} must be the positive global count of {what}, got {value}")


def _check_num_tokens(num_tokens: float | Tensor) -> None:
    _check_count("num_tokens", num_tokens, "response tokens")


def _token_mean(x: Tensor, mask: Tensor, num_tokens: float | Tensor) -> Tensor:
    return masked_sum(x, mask) / num_tokens


def _sequence_mean(x: Tensor, mask: Tensor, num_sequences: float | Tensor) -> Tensor:
    # Per-row token mean, then summed over rows / the global sequence count. A row with an
    # empty mask contributes 0 (its length is clamped to 1 to avoid 0/0).
    per_row = torch.where(mask.bool(), x * mask, 0).sum(-1)
    return (per_row / mask.sum(-1).clamp(min=1)).sum() / num_sequences


def apply_weights(loss_t: Tensor, weights: Tensor | None) -> Tensor:
    """loss_t * weights, detached ([B, T] or None = all ones)."""
    return loss_t if weights is None else loss_t * weights.detach()


# Each aggregator: (loss_t [B, T], mask, num_tokens, num_sequences) -> 0-d.
_AGGREGATORS = {
    "token": lambda x, mask, num_tokens, num_sequences: _token_mean(x, mask, num_tokens),
    "sequence": lambda x, mask, num_tokens, num_sequences: _sequence_mean(x, mask, num_sequences),
}

LOSS_AGGREGATIONS = tuple(_AGGREGATORS)


def _check_aggregation(aggregation: str, num_sequences: float | Tensor | None) -> None:
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(
            f"loss aggregation {aggregation!r} is unknown; use one of {LOSS_AGGREGATIONS}"
        )
    if aggregation == "sequence":
        if num_sequences is None:
            raise ValueError(
                'aggregation="sequence" needs num_sequences, the global count of sequences '
                "in the minibatch (all microbatches, all data-parallel ranks)"
            )
        _check_count("num_sequences", num_sequences, "sequences")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
    num_tokens: float | Tensor,
    *,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    aggregation: str = "token",
    num_sequences: float | Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimised.

        ratio_t = exp(logprobs_t - old_logprobs_t)
        loss_t  = max(-A_t * ratio_t, -A_t * clamp(ratio_t, 1 - c_low, 1 + c_high))
        loss    = aggregate(loss_t)      "token": sum(loss_t * mask) / num_tokens

    cliprange_low / cliprange_high default to cliprange (symmetric PPO). DAPO's
    "clip-higher" (Yu et al. 2025) raises only c_high (e.g. 0.2 / 0.28) so that
    low-probability tokens can gain mass, against entropy collapse.

    aggregation: "token" (default, the PPO trainer's) or "sequence" (GRPO paper; needs
    the global `num_sequences`); see the module docstring.
    weights: optional [B, T] detached per-token weights multiplying loss_t before the
    aggregation (the rollout correction's importance weights, algorithms/correction.py).

    stats:
        policy/pg_loss   the loss (same aggregation)
        policy/clipfrac  fraction of tokens where the clipped term is the larger
        policy/approxkl  0.5 * (logprobs - old_logprobs)^2, TRL's approxkl
        policy/ratio     mean ratio
    The last three are token diagnostics, always sum over masked tokens / num_tokens.
    """
    _check_num_tokens(num_tokens)
    _check_aggregation(aggregation, num_sequences)
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    # Zero the log-ratio outside the mask before exp(): padding log-probs may differ
    # enough to overflow, and inf * 0 would turn the gradient into nan.
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - low, 1.0 + high)
    loss_t = apply_weights(torch.maximum(unclipped, clipped), weights)
    loss = _AGGREGATORS[aggregation](loss_t, mask, num_tokens, num_sequences)
    with torch.no_grad():
        stats = {
            "policy/pg_loss": loss.detach(),
            "policy/clipfrac": _token_mean((clipped > unclipped).to(mask.dtype), mask, num_tokens),
            "policy/approxkl": _token_mean(0.5 * log_ratio.square(), mask, num_tokens),
            "policy/ratio": _token_mean(ratio, mask, num_tokens),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
    num_tokens: float | Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (as in OpenAI's PPO2 and TRL).

        v_clip_t = old_t + clamp(v_t - old_t, -c, c)
        loss_t   = 0.5 * max((v_t - R_t)^2, (v_clip_t - R_t)^2)
        loss     = sum(loss_t * mask) / num_tokens

    stats: val/vf_loss (the loss), val/clipfrac (fraction of tokens where the clipped
    term is the larger), val/mean (mean value), each sum / num_tokens.
    """
    _check_num_tokens(num_tokens)
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped = (values - returns).square()
    clipped = (values_clipped - returns).square()
    loss = _token_mean(0.5 * torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {
            "val/vf_loss": loss.detach(),
            "val/clipfrac": _token_mean((clipped > unclipped).to(mask.dtype), mask, num_tokens),
            "val/mean": _token_mean(values, mask, num_tokens),
        }
    return loss, stats


def entropy_loss(
    entropy: Tensor, mask: Tensor, num_tokens: float | Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Entropy bonus as a loss: -sum(entropy * mask) / num_tokens.

    Minimising it raises the entropy; the caller scales it by the entropy coefficient.
    stats: objective/entropy = +sum(entropy * mask) / num_tokens.
    """
    _check_num_tokens(num_tokens)
    mean_entropy = _token_mean(entropy, mask, num_tokens)
    return -mean_entropy, {"objective/entropy": mean_entropy.detach()}


def sft_loss(
    logprobs: Tensor, mask: Tensor, num_tokens: float | Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of the masked tokens: -sum(logprobs * mask) / num_tokens.

    Used for the PPO-ptx term (Ouyang et al. 2022), scaled by ptx_coef by the caller.
    stats: ptx/loss (the loss).
    """
    _check_num_tokens(num_tokens)
    loss = -_token_mean(logprobs, mask, num_tokens)
    return loss, {"ptx/loss": loss.detach()}


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    num_tokens: float | Tensor,
    estimator: str = "k3",
    *,
    aggregation: str = "token",
    num_sequences: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL(pi || ref) as a loss term (GRPO, Shao et al. 2024, eq. 3-4), [B, T] -> 0-d.

        kl_t = kl_penalty(logprobs, ref_logprobs, estimator)_t     (k3 in the GRPO paper)
        loss = aggregate(kl_t)      "token": sum(kl_t * mask) / num_tokens

    Unlike PPO's KL-shaped reward, the gradient flows through `logprobs`; the caller
    scales the loss by its coefficient (beta). aggregation / num_sequences as in
    `policy_loss`.

    stats: policy/kl (the loss).
    """
    _check_num_tokens(num_tokens)
    _check_aggregation(aggregation, num_sequences)
    # Zero both inputs outside the mask before the estimator: k3's exp(-r) of a padding
    # log-ratio may be inf, and masking afterwards would still give a 0 * inf = nan gradient.
    live = mask.bool()
    kl = kl_penalty(torch.where(live, logprobs, 0), torch.where(live, ref_logprobs, 0), estimator)
    loss = _AGGREGATORS[aggregation](kl, mask, num_tokens, num_sequences)
    return loss, {"policy/kl": loss.detach()}
