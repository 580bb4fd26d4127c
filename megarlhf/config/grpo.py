"""The GRPO stage's config: critic-free, group-relative advantages. Layer: config/.

Field names follow TRL's `GRPOConfig` where one means the same thing (num_generations,
num_iterations, epsilon, epsilon_high, beta, mask_truncated_completions); the estimator
names follow verl's `adv_estimator` (grpo, rloo, reinforce_plus_plus, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megarlhf.config.errors import ConfigError
from megarlhf.config.ppo import OBJECTIVES, RolloutConfig, check_overlong, objective_knobs

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


@dataclass
class GRPOAlgoConfig:
    """The objective of the critic-free stage."""

    num_generations: int = 4
    """Responses sampled per prompt (a group). Rows per iteration = global_batch_size x
    num_generations."""
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """grpo: (s - group mean) / group std (Shao et al. 2024); dr_grpo: s - group mean (Liu
    et al. 2025); rloo: s - mean of the group's other samples; reinforce_pp: KL-shaped
    returns, normalised over the whole batch (Hu 2025); reinforce_pp_baseline: the same on
    group-centred scores."""
    num_iterations: int = 1
    """Passes over each generated batch (GRPO's mu). With 1 pass and 1 minibatch the
    policy is on-policy: the sampling log-probs are the training pass's own, detached."""
    num_mini_batches: int = 1
    """Optimizer steps per pass over the batch (advantages are computed on the whole batch
    first, so a minibatch need not hold whole groups)."""
    epsilon: float = 0.2
    """Lower clip of the ratio (1 - epsilon)."""
    epsilon_high: float = 0.0
    """Upper clip (1 + epsilon_high); 0 = epsilon. DAPO's clip-higher uses 0.28."""
    loss_aggregation: Literal["token", "sequence"] = "token"
    """token: sum over every response token of the minibatch / their number (DAPO, TRL's
    default); sequence: each response's token mean, averaged over responses (the GRPO
    paper)."""
    beta: float = 0.04
    """KL to the reference. Group estimators: beta x KL(k3) as a loss term (the GRPO
    paper); reinforce_pp*: -beta x KL(kl_estimator) per token in the reward. 0 = no
    reference model at all."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Estimator of the per-token KL (k3 for the loss term, k1 or k2 when in the reward)."""
    filter_groups: bool = False
    """Drop groups whose rewards are all equal from the loss (DAPO's dynamic sampling,
    without resampling): they carry no group-relative signal."""
    mask_truncated_completions: bool = False
    """Leave responses that hit response_length without EOS out of the loss."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response that hit response_length without EOS."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0 = off)."""
    policy_loss: Literal["ppo", "gspo", "gspo_token", "cispo", "sapo"] = "ppo"
    """The policy objective (docs/algorithms.md): ppo (clipped token ratio, the GRPO paper's);
    gspo (one clipped length-normalised sequence ratio per response; Zheng et al. 2025 clip at
    epsilon 3e-4 / epsilon_high 4e-4 with loss_aggregation sequence); gspo_token (GSPO's value,
    token advantages); cispo (clip(ratio, 1 - epsilon, 1 + epsilon_high), detached, on
    REINFORCE; MiniMax-M1 bounds only from above, e.g. epsilon 1, epsilon_high 4); sapo (soft
    sigmoid gate, sapo_temperature_pos / _neg)."""
    sapo_temperature_pos: float = 1.0
    """SAPO's gate temperature for tokens with a positive advantage."""
    sapo_temperature_neg: float = 1.05
    """SAPO's gate temperature for tokens with a negative advantage."""
    overlong_buffer_length: int = 0
    """DAPO's soft overlong penalty: the score falls linearly by up to overlong_penalty_factor
    over the last this-many tokens before generation.response_length (0 = off)."""
    overlong_penalty_factor: float = 1.0
    """The penalty at the length cap."""

    def __post_init__(self):
        if self.num_generations < 2:
            raise ConfigError(
                f"grpo.num_generations = {self.num_generations}: a group needs >= 2 samples "
                "(one sample is its own baseline, so its advantage is always 0)"
            )
        if self.num_iterations < 1 or self.num_mini_batches < 1:
            raise ConfigError("grpo.num_iterations and grpo.num_mini_batches must be >= 1")
        if self.epsilon <= 0 or self.epsilon_high < 0:
            raise ConfigError("grpo.epsilon must be > 0 and grpo.epsilon_high >= 0")
        if self.beta < 0:
            raise ConfigError(f"grpo.beta = {self.beta}: must be >= 0")
        if self.policy_loss not in OBJECTIVES:
            raise ConfigError(f"grpo.policy_loss = {self.policy_loss!r}: use one of {', '.join(OBJECTIVES)}")
        if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
            raise ConfigError("grpo.sapo_temperature_pos and grpo.sapo_temperature_neg must be > 0")

    @property
    def objective_knobs(self) -> dict[str, float]:
        """Keyword knobs of the chosen objective (algorithms.POLICY_OBJECTIVES)."""
        return objective_knobs(
            self.policy_loss, self.epsilon, self.epsilon_high or self.epsilon,
            self.sapo_temperature_pos, self.sapo_temperature_neg,
        )  # fmt: skip

    @property
    def in_reward_kl(self) -> bool:
        """REINFORCE++ puts the KL into the per-token reward; the group estimators into the loss."""
        return self.advantage_estimator.startswith("reinforce_pp")


@dataclass
class GRPOConfig(RolloutConfig):
    """GRPO and its critic-free relatives: no critic; `grpo.num_generations` responses per
    prompt, scored, their advantages taken relative to the group (or the batch).

    One iteration: generate num_generations responses for each of
    `train.global_batch_size` prompts, score, compute advantages, then
    `grpo.num_iterations` x `grpo.num_mini_batches` optimizer steps of the actor.
    """

    grpo: GRPOAlgoConfig = field(default_factory=GRPOAlgoConfig)
    """The objective."""

    def __post_init__(self):
        super().__post_init__()
        check_overlong("grpo", self.grpo.overlong_buffer_length, self.generation.response_length)
        if self.rollout_rows % self.grpo.num_mini_batches:
            raise ConfigError(
                f"train.global_batch_size x grpo.num_generations = {self.rollout_rows} responses do "
                f"not split into grpo.num_mini_batches = {self.grpo.num_mini_batches} minibatches"
            )

    @property
    def rollout_rows(self) -> int:
        """Sequences per iteration: prompts x num_generations."""
        return self.train.global_batch_size * self.grpo.num_generations

    @property
    def mini_batch_size(self) -> int:
        """Sequences per optimizer step."""
        return self.rollout_rows // self.grpo.num_mini_batches

    @property
    def optimizer_steps(self) -> int:
        """Actor optimizer steps over the whole run (the LR schedule's length)."""
        return self.train.max_steps * self.grpo.num_iterations * self.grpo.num_mini_batches
