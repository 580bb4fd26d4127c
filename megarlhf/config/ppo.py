"""The PPO stage's config: four roles, generation, and the algorithm's knobs. Layer: config/.

Field names follow TRL's `PPOConfig` where one means the same thing (num_ppo_epochs,
num_mini_batches, cliprange, cliprange_value, vf_coef, gamma, lam, kl_coef,
kl_estimator, whiten_rewards, response_length, temperature, missing_eos_penalty,
sft_model_path, reward_model_path); the adaptive controller keeps the names of TRL's
older PPOConfig (adap_kl_ctrl, target, horizon).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from megarlhf.config.errors import ConfigError
from megarlhf.config.model import ModelConfig
from megarlhf.config.train import DataConfig, LayoutConfig, OptimConfig, RoleLayoutConfig, RunConfig, check_compile


@dataclass
class GenerationConfig:
    """How rollouts are sampled by the in-process engine."""

    response_length: int = 32
    """Most tokens generated per response (a response stops earlier at EOS)."""
    temperature: float = 1.0
    """Sampling temperature; PPO's log-probs use the same one."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off)."""
    tp: int = 0
    """Tensor-parallel size of the engine (0 = the actor's). The engine never uses PP: a
    PP actor generates through a TP-only copy kept in sync by weight refit."""
    old_logprobs: str = "engine"
    """Where the sampling policy's log-probs (PPO's and GRPO's "old" ones) come from:
    'engine' = those the rollout engine computed while sampling (the actor's weights at the
    same temperature; equal to a recompute within 1e-5 in float32), saving one forward pass
    of the actor over the batch; 'recompute' = that extra pass, for when generation and
    training run at different precisions or kernels (e.g. bf16 decode vs bf16 training
    differ more than fp32 does)."""
    cuda_graphs: bool = False
    """Replay each decode step from a CUDA graph (captured once per rollout batch): one
    launch per generated token instead of hundreds from Python, the GPU's cure for small
    per-token kernels (attention in decode steps: torch SDPA, whatever the model trains
    with). On CPU the same fixed-shape decode step runs eagerly."""
    compile: bool = False
    """Run the prefill and the fixed-shape decode step through torch.compile (Inductor). The
    first rollout pays the compile (~10-30 s for a small model on CPU; one more for a second
    batch shape, then none), after which decode steps run ~3x faster on CPU at the examples'
    size. Worth it for runs of more than a few minutes; with cuda_graphs the compiled step is
    captured."""

    def __post_init__(self):
        if self.old_logprobs not in ("engine", "recompute"):
            raise ConfigError(f"generation.old_logprobs = {self.old_logprobs!r}: use 'engine' or 'recompute'")
        if self.response_length < 1:
            raise ConfigError(f"generation.response_length = {self.response_length}: must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(
                f"generation.temperature = {self.temperature}: PPO samples, so it must be > 0"
            )


OBJECTIVES = ("ppo", "gspo", "gspo_token", "cispo", "sapo")


def objective_knobs(policy_loss: str, low: float, high: float, tau_pos: float, tau_neg: float) -> dict[str, float]:
    """The keyword knobs of `algorithms.POLICY_OBJECTIVES[policy_loss]`: a clip range, or
    SAPO's two temperatures."""
    if policy_loss == "sapo":
        return {"temperature_pos": tau_pos, "temperature_neg": tau_neg}
    return {"cliprange_low": low, "cliprange_high": high}


def check_overlong(section: str, buffer_length: int, response_length: int) -> None:
    if not 0 <= buffer_length <= response_length:
        raise ConfigError(
            f"{section}.overlong_buffer_length = {buffer_length}: must be in [0, generation.response_length = "
            f"{response_length}] (0 = off)"
        )


@dataclass
class RolloutCorrectionConfig:
    """The gap between the rollout engine's sampling log-probs and the trainer's (see
    docs/algorithms.md). Its metrics, rollout_correction/*, are logged every iteration."""

    mode: Literal["none", "token_truncate", "sequence_truncate", "token_mask", "sequence_mask"] = "none"
    """Importance-sampling correction of the policy loss by w = exp(trainer - engine) log-probs, a
    detached per-token weight: token_truncate / sequence_truncate = min(w, cap) (TIS; TRL's
    vllm_importance_sampling_mode, verl's rollout_is: token|sequence); token_mask / sequence_mask
    = w inside [mask_low, mask_high], else 0 (masked IS, ICEPOP; verl's rollout_rs). With a
    correction the ratio's old log-probs are the trainer's own (decoupled PPO): one more
    actor forward when generation.old_logprobs = engine."""
    cap: float = 2.0
    """C of the truncating modes (TRL's vllm_importance_sampling_cap, verl's rollout_is_threshold)."""
    mask_low: float = 0.5
    """Lower bound c_min of the masking modes."""
    mask_high: float = 2.0
    """Upper bound c_max of the masking modes."""
    measure: bool = True
    """Compute the rollout_correction/* metrics. They need the trainer's log-probs of the
    sampled tokens at the pre-update weights: free with generation.old_logprobs = recompute,
    one more actor forward pass (time/score/mismatch) with 'engine'. false skips them
    (only with mode = none)."""

    def __post_init__(self):
        if self.cap <= 0 or not 0 <= self.mask_low < 1 < self.mask_high:
            raise ConfigError(
                f"rollout_correction: need cap > 0 and 0 <= mask_low < 1 < mask_high, got cap = {self.cap}, "
                f"mask_low = {self.mask_low}, mask_high = {self.mask_high}"
            )
        if self.mode != "none" and not self.measure:
            raise ConfigError(f"rollout_correction.mode = {self.mode} needs rollout_correction.measure = true")


@dataclass
class PPOAlgoConfig:
    """The PPO objective (Ouyang et al. 2022; Ziegler et al. 2019)."""

    num_ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Optimizer steps per pass (the rollout batch is split into this many minibatches)."""
    cliprange: float = 0.2
    """Policy ratio clip epsilon."""
    cliprange_value: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss (the critic has its own optimizer; this scales its loss)."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.05
    """KL penalty beta (the initial value when adap_kl_ctrl)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator of the penalty (Schulman's k1, k2, k3)."""
    adap_kl_ctrl: bool = True
    """Adapt kl_coef towards `target` (Ziegler et al.); false = fixed kl_coef."""
    target: float = 1.0
    """Target KL per sequence (nats) of the adaptive controller."""
    horizon: float = 10000.0
    """Adaptive controller horizon in samples."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    whiten_rewards: bool = False
    """Whiten the shaped rewards before GAE."""
    whiten_advantages: bool = True
    """Whiten the advantages over the rollout batch (masked, global over DP)."""
    normalize_reward: bool = False
    """Divide scores by a running std (and subtract the running mean) before shaping."""
    reward_clip: float = 0.0
    """Clip scores to [-reward_clip, reward_clip] (0 = off)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response that hit response_length without EOS."""
    ptx_coef: float = 0.0
    """Weight of the SFT loss on `ptx_file` mixed into every actor step (InstructGPT's
    PPO-ptx; 0 = off)."""
    policy_loss: Literal["ppo", "gspo_token", "cispo", "sapo"] = "ppo"
    """The actor's objective (docs/algorithms.md): ppo (clipped ratio), gspo_token (GSPO's
    sequence ratio with token advantages), cispo (clipped detached IS weight on REINFORCE; the
    clip range is cliprange), sapo (soft gate). gspo needs one advantage per sequence: GRPO only."""
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
        if self.num_ppo_epochs < 1 or self.num_mini_batches < 1:
            raise ConfigError("ppo.num_ppo_epochs and ppo.num_mini_batches must be >= 1")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"ppo.gamma = {self.gamma}, ppo.lam = {self.lam}: must be in [0, 1]")
        if self.cliprange <= 0 or self.cliprange_value <= 0:
            raise ConfigError("ppo.cliprange and ppo.cliprange_value must be > 0")
        if self.kl_coef < 0 or self.target <= 0 or self.horizon <= 0:
            raise ConfigError("ppo.kl_coef must be >= 0, ppo.target and ppo.horizon > 0")
        if self.ptx_coef < 0:
            raise ConfigError(f"ppo.ptx_coef = {self.ptx_coef}: must be >= 0")
        if self.policy_loss not in OBJECTIVES or self.policy_loss == "gspo":
            raise ConfigError(
                f"ppo.policy_loss = {self.policy_loss!r}: use ppo, gspo_token, cispo or sapo (gspo needs "
                "one advantage per sequence; GAE gives one per token)"
            )
        if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
            raise ConfigError("ppo.sapo_temperature_pos and ppo.sapo_temperature_neg must be > 0")

    @property
    def objective_knobs(self) -> dict[str, float]:
        """Keyword knobs of the chosen objective (algorithms.POLICY_OBJECTIVES)."""
        c = self.cliprange
        return objective_knobs(self.policy_loss, c, c, self.sapo_temperature_pos, self.sapo_temperature_neg)


@dataclass
class RolloutConfig:
    """What every online stage (PPO, GRPO) shares: the policy, its frozen reference, the
    reward (model and/or rule), the rollout engine, data and the run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy's shape (actor and reference)."""
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    """The actor's TP/PP."""
    reference_layout: RoleLayoutConfig = field(default_factory=RoleLayoutConfig)
    """The frozen reference policy's TP/PP (0 = the actor's)."""
    reward_layout: RoleLayoutConfig = field(default_factory=RoleLayoutConfig)
    """The frozen reward model's TP/PP (0 = the actor's)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The actor's optimizer."""
    data: DataConfig = field(default_factory=DataConfig)
    """Tokenizer and prompt files ({"prompt": ...} JSONL); max_length bounds the prompt."""
    train: RunConfig = field(default_factory=RunConfig)
    """max_steps = iterations; global_batch_size = prompts per iteration;
    micro_batch_size = sequences per forward/backward."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling of rollouts."""
    sft_model_path: str = ""
    """Checkpoint of the SFT policy: the actor's and the reference's initial weights."""
    reward_model_path: str = ""
    """Checkpoint of a trained reward model ('' = none). Its shape comes from its run's
    config."""
    reward_fn: str = ""
    """Rule-based reward 'module:function' ('' = none), e.g.
    megarlhf.data.synthetic:sort_reward_batch, or a built-in name: gsm8k, gsm8k_flexible,
    boxed, math, math_format (rollout/math_rewards.py)."""
    reward_model_weight: float = 1.0
    """Score = reward_model_weight * RM score + reward_fn_weight * rule score."""
    reward_fn_weight: float = 1.0
    """See reward_model_weight."""
    offload_optimizer: bool = False
    """GPU only: move the trainable roles' optimizer states and gradient buffers to CPU
    while generating and scoring (Megatron-Core's offload_to_cpu and
    offload_grad_buffers), back before training. Ignored without CUDA."""
    offload_frozen: bool = False
    """GPU only: keep the reference and reward models' weights on CPU except while they
    score. Ignored without CUDA."""
    eval_greedy: bool = False
    """Decode held-out prompts (data.eval_file) greedily; default: sample at
    generation.temperature, i.e. measure the expected reward the stage maximises."""
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    """Engine/trainer mismatch: metrics (always on) and optional importance-sampling corrections."""

    def __post_init__(self):
        if not self.data.tokenizer or not self.data.train_file:
            raise ConfigError("data.tokenizer and data.train_file (prompts) are required")
        if not self.sft_model_path:
            raise ConfigError("sft_model_path is required: the checkpoint of the SFT policy")
        if not self.reward_model_path and not self.reward_fn:
            raise ConfigError("no reward: set reward_model_path, reward_fn, or both")
        total = self.data.max_length + self.generation.response_length
        if total > self.model.max_seq_length:
            raise ConfigError(
                f"data.max_length + generation.response_length = {self.data.max_length} + "
                f"{self.generation.response_length} = {total} exceeds model.max_seq_length = "
                f"{self.model.max_seq_length}"
            )
        check_compile(self)

    trainable_roles: ClassVar[tuple[str, ...]] = ("actor",)

    @property
    def rollout_rows(self) -> int:
        """Sequences generated per iteration."""
        return self.train.global_batch_size

    @property
    def mini_batch_size(self) -> int:
        """Sequences per optimizer step."""
        raise NotImplementedError

    def check_batch_split(self, dp: dict[str, int]) -> int:
        """Every role must split the rollout batch, and each trainable role each minibatch,
        into whole microbatches on each of its `dp[role]` data-parallel ranks (the engine,
        role 'rollout', just into equal shares). Raises ConfigError; returns the row
        multiple every batch the roles see must respect."""
        mbs = self.train.micro_batch_size
        needs = {role: (n if role == "rollout" else mbs * n) for role, n in dp.items()}
        for role, need in needs.items():
            if role in self.trainable_roles:
                size, what = self.mini_batch_size, "the minibatch"
            else:
                size, what = self.rollout_rows, "the rollout batch"
            if size % need:
                raise ConfigError(
                    f"{what} = {size} sequences does not split over the {role}'s {dp[role]} "
                    f"data-parallel ranks x micro_batch_size {mbs}: make it a multiple of {need} "
                    f"(train.global_batch_size sets it)"
                )
        return math.lcm(*needs.values())


@dataclass
class PPOConfig(RolloutConfig):
    """PPO with an actor, a critic, a frozen reference and a reward (model and/or rule).

    One iteration: generate a response for each of `train.global_batch_size` prompts,
    score, compute advantages, then `ppo.num_ppo_epochs` x `ppo.num_mini_batches`
    optimizer steps of the actor and of the critic.
    """

    critic_layout: RoleLayoutConfig = field(default_factory=RoleLayoutConfig)
    """The critic's TP/PP (0 = the actor's)."""
    critic_optim: OptimConfig = field(default_factory=OptimConfig)
    """The critic's optimizer."""
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    """The objective."""
    value_model_path: str = ""
    """Checkpoint the critic starts from ('' = the reward model, or the SFT policy's body
    with a fresh value head when there is no reward model)."""
    ptx_file: str = ""
    """SFT data ({"prompt","response"} or {"messages"}, any format data.train_file takes,
    the same data.*_key columns) for the ppo.ptx_coef term."""
    ptx_batch_size: int = 0
    """SFT sequences per actor optimizer step for the ptx term (0 = the PPO minibatch
    size, global_batch_size / num_mini_batches)."""

    def __post_init__(self):
        super().__post_init__()
        if self.ppo.ptx_coef and not self.ptx_file:
            raise ConfigError("ppo.ptx_coef > 0 needs ptx_file (SFT data for the ptx term)")
        check_overlong("ppo", self.ppo.overlong_buffer_length, self.generation.response_length)
        if self.train.global_batch_size % self.ppo.num_mini_batches:
            raise ConfigError(
                f"train.global_batch_size = {self.train.global_batch_size} does not split into "
                f"ppo.num_mini_batches = {self.ppo.num_mini_batches} minibatches"
            )

    trainable_roles: ClassVar[tuple[str, ...]] = ("actor", "critic")

    @property
    def mini_batch_size(self) -> int:
        """Sequences per optimizer step."""
        return self.train.global_batch_size // self.ppo.num_mini_batches

    @property
    def ptx_rows(self) -> int:
        """SFT sequences per actor step for the ptx term (0 when it is off)."""
        return (self.ptx_batch_size or self.mini_batch_size) if self.ppo.ptx_coef else 0

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of each trainable role over the whole run (the LR schedule's length)."""
        return self.train.max_steps * self.ppo.num_ppo_epochs * self.ppo.num_mini_batches
