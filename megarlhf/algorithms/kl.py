"""Per-token KL estimators between the policy and the reference model.

Layer: algorithms/ (pure torch; no config objects, no process groups).

With r = logprobs - ref_logprobs = log pi(x)/pi_ref(x) for a token x sampled from pi,
Schulman, "Approximating KL divergence" (2020), gives three estimators of KL(pi || ref):

    k1 = r                      unbiased, high variance, can be negative
    k2 = r**2 / 2               biased, low variance, >= 0
    k3 = exp(-r) - 1 + r        unbiased, low variance, >= 0 (since e^y >= 1 + y)
"""

from __future__ import annotations

from typing import Callable

import torch

_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": lambda log_ratio: log_ratio,
    "k2": lambda log_ratio: 0.5 * log_ratio.square(),
    "k3": lambda log_ratio: torch.expm1(-log_ratio) + log_ratio,
}

KL_ESTIMATORS = tuple(_ESTIMATORS)


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token KL estimate, [B, T] -> [B, T], not masked (the caller masks).

    Positions outside the response may hold anything, including inf for k3 where the
    two models disagree wildly on a padding token: mask with `torch.where`, not `* mask`.
    """
    fn = _ESTIMATORS.get(estimator)
    if fn is None:
        raise ValueError(f"kl estimator {estimator!r} is unknown; use one of {KL_ESTIMATORS}")
    return fn(logprobs - ref_logprobs)
