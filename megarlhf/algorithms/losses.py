"""PPO policy and value losses, entropy bonus and the SFT (PPO-ptx) term.

Layer: algorithms/ (pure torch; no config objects, no process groups, no `.item()`).

Inputs are [B, T], aligned to token position, with a float `mask` (1 = response token).
Every loss and statistic is `sum over masked tokens / num_tokens`, where `num_tokens`
is the number of masked tokens in the *global* minibatch (all microbatches on all
data-parallel ranks), counted before the microbatch loop. Summing a loss or a statistic
over microbatches and ranks then gives the global token mean, and the gradient does not
depend on how the minibatch was split. Dividing by a local `mask.sum()` would weight
tokens of short microbatches more.

Each function returns (loss, stats): loss a differentiable 0-d tensor, stats a dict of
detached 0-d tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megarlhf.algorithms.advantages import masked_sum


def _check_num_tokens(num_tokens: float | Tensor) -> None:
    # Only a Python number is checked: testing a tensor would be a host sync.
    if not isinstance(num_tokens, Tensor) and num_tokens <= 0:
        raise ValueError(
            f"num_tokens must be the positive global count of response tokens, got {num_tokens}"
        )


def _token_mean(x: Tensor, mask: Tensor, num_tokens: float | Tensor) -> Tensor:
    return masked_sum(x, mask) / num_tokens


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
    num_tokens: float | Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimised.

        ratio_t = exp(logprobs_t - old_logprobs_t)
        loss_t  = max(-A_t * ratio_t, -A_t * clamp(ratio_t, 1 - c, 1 + c))
        loss    = sum(loss_t * mask) / num_tokens

    stats (each a sum over masked tokens / num_tokens):
        policy/pg_loss   the loss
        policy/clipfrac  fraction of tokens where the clipped term is the larger
        policy/approxkl  0.5 * (logprobs - old_logprobs)^2, TRL's approxkl
        policy/ratio     mean ratio
    """
    _check_num_tokens(num_tokens)
    # Zero the log-ratio outside the mask before exp(): padding log-probs may differ
    # enough to overflow, and inf * 0 would turn the gradient into nan.
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, 0)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = _token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
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
