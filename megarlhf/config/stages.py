"""Top-level configs of the supervised stages (SFT, reward model). Layer: config/."""

from __future__ import annotations

from dataclasses import dataclass, field

from megarlhf.config.errors import ConfigError
from megarlhf.config.model import ModelConfig
from megarlhf.config.train import DataConfig, LayoutConfig, OptimConfig, RunConfig


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
    """Tokenizer and JSONL files ({"prompt","response"} or {"messages": [...]})."""
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


@dataclass
class RMConfig(SFTConfig):
    """Reward model: Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l) - margin),
    the score read at the last non-pad token of each sequence."""

    margin: float = 0.0
    """Required reward gap between chosen and rejected (0 = plain Bradley-Terry)."""
    center_rewards_coefficient: float = 0.0
    """Weight of an auxiliary (r_w + r_l)^2 term that keeps rewards centred at 0 (TRL's name)."""
