"""Top-level configs of the supervised stages (SFT, reward model). Layer: config/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megarlhf.config.errors import ConfigError
from megarlhf.config.model import ModelConfig
from megarlhf.config.train import DataConfig, LayoutConfig, OptimConfig, RoleLayoutConfig, RunConfig, check_compile


@dataclass
class SFTConfig:
    """Supervised fine-tuning: next-token loss on response (assistant) tokens only."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy's shape."""
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    """TP/PP of the model (dp = world size / (tp * pp))."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Tokenizer and data files ({"prompt","response"} or {"messages": [...]}; JSONL, JSON,
    Parquet, Arrow, save_to_disk folders or hub: names, see docs/data.md)."""
    train: RunConfig = field(default_factory=RunConfig)
    """Steps, batch sizes, logging, checkpoints."""
    init_from: str = ""
    """Checkpoint (a run_dir, its checkpoints/ folder or one iter_ folder) to start the
    weights from; '' = random init."""

    def __post_init__(self):
        if not self.data.tokenizer or not self.data.train_file:
            raise ConfigError("data.tokenizer and data.train_file are required")
        if self.data.max_length > self.model.max_seq_length:
            raise ConfigError(
                f"data.max_length = {self.data.max_length} exceeds model.max_seq_length = "
                f"{self.model.max_seq_length}"
            )
        check_compile(self)


@dataclass
class RMConfig(SFTConfig):
    """Reward model: Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l) - margin),
    the score read at the last non-pad token of each sequence."""

    margin: float = 0.0
    """Required reward gap between chosen and rejected (0 = plain Bradley-Terry)."""
    center_rewards_coefficient: float = 0.0
    """Weight of an auxiliary (r_w + r_l)^2 term that keeps rewards centred at 0 (TRL's name)."""


@dataclass
class DPOConfig(SFTConfig):
    """Direct preference optimisation (Rafailov et al. 2023) against a frozen reference
    policy: no reward model, no critic, no generation. Data: preference pairs
    {"prompt","chosen","rejected"}. The reference runs at the policy's layout inside each
    step, or once up front at its own (precompute_ref_log_probs)."""

    beta: float = 0.1
    """Strength of the implicit KL constraint (TRL's beta)."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid = DPO, ipo = IPO (Azar et al.), hinge = SLiC-style hinge (TRL's names)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed probability that a preference label is flipped
    (sigmoid loss only)."""
    rpo_alpha: float = 0.0
    """RPO: add rpo_alpha x the token-mean NLL of the chosen response (0 = off)."""
    ref_model_path: str = ""
    """Checkpoint of the reference policy ('' = init_from, the usual choice)."""
    precompute_ref_log_probs: bool = False
    """Score every train and eval pair with the reference once, before training (at
    reference_layout), keep the log-probs with the data (and in
    run_dir/reference_logps.pt, reused on resume), then free the reference: training
    steps run the policy only (TRL's name). False: the reference scores each microbatch
    inside the step, at the policy's layout."""
    reference_layout: RoleLayoutConfig = field(default_factory=RoleLayoutConfig)
    """TP/PP of the reference (0 = the policy's); another layout needs
    precompute_ref_log_probs."""
    win_rate_prompts: str = ""
    """RL prompts file ({"prompt"[, "answer"]}, any data format) to measure the policy's
    win rate against the reference at every evaluation: both answer each prompt (sampled,
    the same seed per prompt for both), `reward_fn` scores both answers; ties count half
    ('' = off)."""
    reward_fn: str = ""
    """Rule 'module:function' that scores the answers for win_rate_prompts."""
    win_rate_response_length: int = 24
    """Tokens generated per answer for the win rate."""
    win_rate_temperature: float = 1.0
    """Sampling temperature of those answers (0 = greedy)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.init_from:
            raise ConfigError("init_from is required: the SFT policy DPO starts from (and, by default, its reference)")
        if self.beta <= 0:
            raise ConfigError(f"beta = {self.beta}: must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing = {self.label_smoothing}: must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError("label_smoothing applies to loss_type sigmoid only")
        if self.rpo_alpha < 0:
            raise ConfigError(f"rpo_alpha = {self.rpo_alpha}: must be >= 0")
        ref_layout = self.reference_layout.resolve(self.layout)
        if ref_layout != (self.layout.tp, self.layout.pp) and not self.precompute_ref_log_probs:
            raise ConfigError(
                f"reference_layout tp={ref_layout[0]} pp={ref_layout[1]} differs from the policy's "
                f"layout: set precompute_ref_log_probs=true (the reference then scores the data once, "
                f"at its own layout) or leave reference_layout at 0 (scored inside each step)"
            )
        if self.win_rate_prompts and not self.reward_fn:
            raise ConfigError("win_rate_prompts needs reward_fn, the rule that scores the answers")
        if self.win_rate_prompts and self.layout.pp != 1:
            raise ConfigError(
                "win_rate_prompts generates with the rollout engine on the policy's own weights, "
                f"which needs layout.pp = 1 (got {self.layout.pp}); evaluate the checkpoint at pp=1"
            )
        if self.win_rate_prompts and ref_layout[1] != 1:
            raise ConfigError(
                f"win_rate_prompts generates with the reference too, which needs reference_layout.pp = 1 "
                f"(got {ref_layout[1]})"
            )
