"""RL math as pure functions of [B, T] tensors. Layer: algorithms/.

Imports only torch and the standard library: no Megatron, no process groups, no config
objects. Losses take the global token count as an argument (see losses.py).
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
from megarlhf.algorithms.kl import KL_ESTIMATORS, kl_penalty
from megarlhf.algorithms.losses import entropy_loss, policy_loss, sft_loss, value_loss
from megarlhf.algorithms.rewards import RunningMoments, clip_scores, normalize_scores

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "clip_scores",
    "entropy_loss",
    "gae",
    "kl_penalty",
    "last_token_index",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "normalize_scores",
    "policy_loss",
    "sft_loss",
    "shape_rewards",
    "value_loss",
]
