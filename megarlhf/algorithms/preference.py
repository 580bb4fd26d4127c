"""Direct preference losses (DPO, cDPO, IPO, hinge/SLiC) and the RPO NLL term.

Layer: algorithms/ (pure torch; no config objects, no process groups, no host syncs).

Inputs are per-sequence log-probabilities, [B] with one entry per preference pair: the
trainer reduces its [B, T] token log-probs over each response with `sequence_logps` (sum,
the DPO convention) or `sequence_mean_logps` (length-averaged, TRL's IPO convention).
With the implicit reward of DPO (Rafailov et al. 2023), r = beta * (log pi - log ref),
everything depends on the log-ratio difference

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected).

Losses and statistics are `sum over pairs / num_pairs`, `num_pairs` being the global
number of pairs in the minibatch (all microbatches, all data-parallel ranks): summed
over microbatches and ranks they give the global mean, whatever the split.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from megarlhf.algorithms.losses import _check_count


def sequence_logps(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Sum of the masked token log-probs of each row, [B, T] -> [B]; 0 for an empty row."""
    return torch.where(mask.bool(), token_logprobs * mask, 0).sum(-1)


def sequence_mean_logps(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Token-mean of the masked log-probs of each row, [B, T] -> [B]; 0 for an empty row.

    The per-row length is local by nature, so this needs no global denominator.
    """
    return sequence_logps(token_logprobs, mask) / mask.sum(-1).clamp(min=1)


# Per-pair losses of the log-ratio difference h, [num pairs] -> [num pairs].
# (h, beta, label_smoothing) -> loss.
_DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    # DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta h). With label smoothing eps,
    # cDPO (Mitchell 2023) assumes labels flipped with probability eps:
    # (1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h).
    "sigmoid": lambda h, beta, eps: -(1 - eps) * F.logsigmoid(beta * h)
    - eps * F.logsigmoid(-beta * h),
    # IPO (Azar et al. 2023, eq. 17): squared regression of h onto 1 / (2 beta), where
    # beta plays the role of the paper's tau.
    "ipo": lambda h, beta, eps: (h - 1 / (2 * beta)).square(),
    # Hinge (SLiC, Zhao et al. 2023, with the reference log-ratio as in TRL): relu(1 - beta h).
    "hinge": lambda h, beta, eps: torch.relu(1 - beta * h),
}

DPO_LOSS_TYPES = tuple(_DPO_LOSSES)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    num_pairs: float | Tensor,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Preference loss of a batch of pairs, [B] x 4 -> 0-d, summed / num_pairs.

        h    = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        loss = sum_pairs loss_type(h) / num_pairs, with loss_type in DPO_LOSS_TYPES:

        "sigmoid"  (1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h)
                   DPO; eps = label_smoothing > 0 gives cDPO (conservative DPO).
        "ipo"      (h - 1 / (2 beta))^2
        "hinge"    relu(1 - beta h)

    Log-prob convention: the function uses whatever per-sequence log-probs it is given.
    DPO is defined on summed log-probs (`sequence_logps`). TRL's IPO divides them by the
    response length first (IPO's regression target 1 / (2 beta) is then on a per-token
    scale); to match it, pass `sequence_mean_logps` for all four inputs (policy and ref).

    label_smoothing must lie in [0, 0.5] and is only defined for "sigmoid".

    stats (each a sum over pairs / num_pairs, named as in TRL's DPOTrainer):
        dpo/loss             the loss
        rewards/chosen       beta * (policy_chosen - ref_chosen)
        rewards/rejected     beta * (policy_rejected - ref_rejected)
        rewards/accuracies   fraction of pairs with rewards/chosen > rewards/rejected
        rewards/margins      rewards/chosen - rewards/rejected
        logps/chosen         policy_chosen
        logps/rejected       policy_rejected
    """
    fn = _DPO_LOSSES.get(loss_type)
    if fn is None:
        raise ValueError(f"dpo loss_type {loss_type!r} is unknown; use one of {DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpo label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(
            f'label_smoothing (cDPO) is defined for loss_type="sigmoid" only, got '
            f"loss_type={loss_type!r} with label_smoothing={label_smoothing}; set it to 0"
        )
    _check_count("num_pairs", num_pairs, "preference pairs")

    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_log_ratio - rejected_log_ratio
    loss = fn(h, beta, label_smoothing).sum() / num_pairs
    with torch.no_grad():
        chosen_rewards = beta * chosen_log_ratio
        rejected_rewards = beta * rejected_log_ratio
        stats = {
            "dpo/loss": loss.detach(),
            "rewards/chosen": chosen_rewards.sum() / num_pairs,
            "rewards/rejected": rejected_rewards.sum() / num_pairs,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(h.dtype).sum()
            / num_pairs,
            "rewards/margins": (chosen_rewards - rejected_rewards).sum() / num_pairs,
            "logps/chosen": policy_chosen_logps.detach().sum() / num_pairs,
            "logps/rejected": policy_rejected_logps.detach().sum() / num_pairs,
        }
    return loss, stats


def rpo_term(
    policy_chosen_logps: Tensor,
    chosen_lengths: Tensor,
    alpha: float,
    num_pairs: float | Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RPO's SFT regulariser: alpha * NLL of the chosen responses, [B], [B] -> 0-d.

        nll_i = -policy_chosen_logps_i / chosen_lengths_i      (token-mean per sequence)
        loss  = alpha * sum_i nll_i / num_pairs

    Iterative RPO (Pang et al. 2024, eq. 1) adds this length-normalised NLL of the chosen
    (winning) response to the DPO loss; add the two losses. `policy_chosen_logps` are
    *summed* log-probs (`sequence_logps`) and `chosen_lengths` the number of response
    tokens of each chosen row (`mask.sum(-1)`); a zero length is clamped to 1.

    Note: TRL's `rpo_alpha` takes the token mean over all chosen tokens of the local batch
    instead, which weighs long responses more and depends on the microbatch split; the
    per-sequence mean here does not.

    stats: nll_loss = sum_i nll_i / num_pairs (unscaled by alpha, as TRL logs it).
    """
    if alpha < 0:
        raise ValueError(f"rpo alpha must be >= 0, got {alpha}")
    _check_count("num_pairs", num_pairs, "preference pairs")
    nll = -(policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1))
    nll_mean = nll.sum() / num_pairs
    return alpha * nll_mean, {"nll_loss": nll_mean.detach()}
