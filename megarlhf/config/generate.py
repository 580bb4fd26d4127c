"""The `megarlhf generate` config: a checkpoint, prompts, sampling, optional scoring. Layer: config/."""

from __future__ import annotations

from dataclasses import dataclass, field

from megarlhf.config.errors import ConfigError
from megarlhf.config.train import DataConfig, LayoutConfig


@dataclass
class GenerateConfig:
    """Batch generation from any checkpoint with the rollout engine, optionally scored."""

    model_path: str = ""
    """What to generate with: a megarlhf checkpoint (an SFT/PPO/GRPO/DPO run directory, its
    checkpoints/ folder or one iter_ folder; a folder written by
    tools/convert_hf_to_megatron.py) or a Hugging Face folder (config.json + safetensors).
    Checkpoints saved at any TP/PP load at `layout.tp`."""
    role: str = "actor"
    """Which model of the checkpoint generates (trainers and the converter save the policy as 'actor')."""
    prompts: str = ""
    """Prompt file: JSONL, one {"prompt": str | messages[, "answer": ...]} per line."""
    output: str = ""
    """Output JSONL: one line per sample with prompt, response, score, finish_reason, token
    counts ('' = <prompts>.generated.jsonl beside the prompts). A <output>.summary.json
    with the scores' statistics is written beside it when there is a scorer."""
    data: DataConfig = field(default_factory=DataConfig)
    """Tokenizer ('' = the checkpoint's: a Hugging Face folder's own files, a converted
    model's hf/ folder, or the training run's data.tokenizer) and prompt shaping:
    max_length bounds a prompt's tokens (truncation 'error' or 'drop'), on_error handles
    bad lines. data.train_file and data.eval_file are not used: the prompts come from `prompts`."""
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    """Tensor-parallel size of the engine; the world's other ranks are data-parallel
    replicas sharing the prompts. The engine runs TP-only: layout.pp must be 1."""
    n: int = 1
    """Samples per prompt (each with its own seed: (seed, prompt index, sample index))."""
    max_new_tokens: int = 256
    """Most tokens generated per sample (a sample stops earlier at EOS)."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off)."""
    seed: int = 0
    """Base of every sample's seed: the same seed gives the same samples at any TP, DP or batch size."""
    batch_size: int = 32
    """Sequences (prompts x samples) per engine call on one data-parallel replica."""
    reward_fn: str = ""
    """Rule that scores each sample, 'module:function' or a built-in name (gsm8k, math,
    boxed, gsm8k_flexible, math_format); it reads the prompt file's answer column."""
    reward_model_path: str = ""
    """Checkpoint of a reward model that scores each sample (at layout.tp; '' = none). With
    reward_fn too, score = rule + reward model."""
    best_of_n: bool = False
    """Write only each prompt's best-scoring sample (ties: the first); needs n > 1 and a
    scorer. The summary then reports the best samples' scores too."""
    confidence: float = 0.95
    """Confidence level of the intervals printed with the scores."""

    def __post_init__(self):
        if not self.model_path or not self.prompts:
            raise ConfigError("model_path and prompts are required (e.g. model_path=runs/grpo prompts=test.jsonl)")
        if self.layout.pp != 1:
            raise ConfigError(
                f"layout.pp = {self.layout.pp}: generation runs tensor-parallel only (checkpoints saved at any "
                "PP load resharded); set layout.pp=1 and use layout.tp and more ranks instead"
            )
        if self.n < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError(
                f"n = {self.n}, max_new_tokens = {self.max_new_tokens}, batch_size = {self.batch_size}: must be >= 1"
            )
        if self.temperature < 0:
            raise ConfigError(f"temperature = {self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_k = {self.top_k}, top_p = {self.top_p}: need top_k >= 0 and 0 < top_p <= 1")
        if self.best_of_n and (self.n < 2 or not (self.reward_fn or self.reward_model_path)):
            raise ConfigError("best_of_n needs n >= 2 and a scorer (reward_fn and/or reward_model_path)")
        if self.n > 1 and self.temperature == 0:
            raise ConfigError(f"n = {self.n} greedy samples would all be the same: set temperature > 0")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence = {self.confidence}: must be in (0, 1)")
        if self.data.truncation == "right":
            raise ConfigError("data.truncation = right would cut a prompt's assistant marker: use error or drop")

    @property
    def output_path(self) -> str:
        if self.output:
            return self.output
        stem = self.prompts[: -len(".jsonl")] if self.prompts.endswith(".jsonl") else self.prompts
        return f"{stem}.generated.jsonl"
