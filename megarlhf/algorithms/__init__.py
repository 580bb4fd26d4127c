"""RL math as pure functions of [B, T] tensors. Layer: algorithms/.

Imports only torch and the standard library: no Megatron, no process groups, no config
objects. Losses take the global token (or sequence, or pair) count as an argument (see
losses.py).
"""

from megarlhf.algorithms.advantages import (
    gae,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    shape_rewards,
)
from megarlhf.algorithms.controllers import (
    AdaptiveKLController,
    FixedKLController,
    make_kl_controller,
)
from megarlhf.algorithms.correction import ROLLOUT_CORRECTIONS, mismatch_metrics, rollout_is_weights
from megarlhf.algorithms.group import (
    GROUP_ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    filter_uniform_groups,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
)
from megarlhf.algorithms.kl import KL_ESTIMATORS, kl_penalty
from megarlhf.algorithms.losses import (
    LOSS_AGGREGATIONS,
    entropy_loss,
    kl_loss,
    policy_loss,
    sft_loss,
    value_loss,
)
from megarlhf.algorithms.objectives import (
    CLIP_OBJECTIVES,
    POLICY_OBJECTIVES,
    SEQUENCE_ADVANTAGE_OBJECTIVES,
    cispo_loss,
    gspo_loss,
    gspo_token_loss,
    sapo_loss,
)
from megarlhf.algorithms.preference import (
    DPO_LOSS_TYPES,
    dpo_loss,
    rpo_term,
    sequence_logps,
    sequence_mean_logps,
)
from megarlhf.algorithms.rewards import RunningMoments, clip_scores, normalize_scores, overlong_penalty

__all__ = [
    "CLIP_OBJECTIVES",
    "POLICY_OBJECTIVES",
    "ROLLOUT_CORRECTIONS",
    "SEQUENCE_ADVANTAGE_OBJECTIVES",
    "cispo_loss",
    "gspo_loss",
    "gspo_token_loss",
    "mismatch_metrics",
    "overlong_penalty",
    "rollout_is_weights",
    "sapo_loss",
    "DPO_LOSS_TYPES",
    "GROUP_ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "broadcast_to_tokens",
    "clip_scores",
    "dpo_loss",
    "entropy_loss",
    "filter_uniform_groups",
    "gae",
    "grpo_advantages",
    "kl_loss",
    "kl_penalty",
    "last_token_index",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "normalize_scores",
    "policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_returns",
    "rloo_advantages",
    "rpo_term",
    "sequence_logps",
    "sequence_mean_logps",
    "sft_loss",
    "shape_rewards",
    "value_loss",
]
