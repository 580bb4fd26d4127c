"""Sections shared by every stage: layout, optimisation, data, run bookkeeping.

Layer: config/. Field names follow TRL where a TRL field means the same thing
(learning_rate, max_grad_norm, warmup_steps, lr_scheduler_type, max_steps, logging_steps,
save_steps, save_total_limit, eval_steps, max_length, seed).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from megarlhf.config.errors import ConfigError


@dataclass
class LayoutConfig:
    """How one role's model is split over the ranks; dp follows from the world size."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""

    def __post_init__(self):
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"layout.{name} = {getattr(self, name)}: must be >= 1")


@dataclass
class RoleLayoutConfig:
    """TP/PP of a role other than the actor; 0 = the actor's value."""

    tp: int = 0
    """Tensor-parallel size (0 = the actor's)."""
    pp: int = 0
    """Pipeline-parallel size (0 = the actor's)."""

    def __post_init__(self):
        if self.tp < 0 or self.pp < 0:
            raise ConfigError(f"role layout tp={self.tp} pp={self.pp}: must be >= 0 (0 = the actor's)")

    def resolve(self, actor: LayoutConfig) -> tuple[int, int]:
        return self.tp or actor.tp, self.pp or actor.pp


@dataclass
class OptimConfig:
    """Adam(W) through Megatron-Core's optimizer and its LR/WD scheduler."""

    learning_rate: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_epsilon: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states over data-parallel ranks (ZeRO-1)."""
    grad_reduce_in_fp32: bool = True
    """With bf16/fp16 parameters: accumulate gradients over micro-batches and reduce them
    over data-parallel ranks in float32 (Megatron's grad_reduce_in_fp32). False halves the
    gradient buffer but rounds every partial sum to 8 mantissa bits (docs/precision.md)."""

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate = {self.learning_rate}: must be > 0")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"optim.min_lr = {self.min_lr}: must be in [0, learning_rate]")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("optim.warmup_steps, max_grad_norm and weight_decay must be >= 0")


@dataclass
class DataConfig:
    """Where the data and tokenizer come from and how samples are shaped."""

    tokenizer: str = ""
    """Path to a sentencepiece .model, a Hugging Face tokenizer.json, or a folder holding one
    (an HF model folder, or a converted checkpoint's hf/ folder: its tokenizer_config.json,
    special_tokens_map.json and generation_config.json name the special tokens, every
    eos_token_id stops generation). '' with init_from / sft_model_path set = that model's."""
    bos_token: str = ""
    """BOS piece, overriding the tokenizer's files ('' = theirs; 'none' = the model has no BOS)."""
    eos_token: str = ""
    """EOS piece, overriding the tokenizer's files ('' = theirs)."""
    pad_token: str = ""
    """PAD piece, overriding the tokenizer's files ('' = theirs, else EOS; padding is found from
    lengths, so a PAD equal to EOS never hides the real EOS from the loss)."""
    chat_template: str = ""
    """'' = the tokenizer's own Jinja template (tokenizer_config.json's chat_template or
    chat_template.jinja; megarlhf's role markers for a sentencepiece model or a bare
    tokenizer.json); 'builtin' = megarlhf's role markers; or a path to a Jinja template."""
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """Which assistant turns of a conversation the loss trains on."""
    train_file: str = ""
    """Training data: JSONL, a JSON array, Parquet (a file or a folder of them), an Arrow
    file, a datasets.save_to_disk folder, or hub:NAME[:CONFIG][@SPLIT] (docs/data.md)."""
    eval_file: str = ""
    """Held-out data, in any format train_file takes ('' = no evaluation)."""
    prompt_key: str = "prompt"
    """Column holding the prompt (a string or a message list); a dotted name reads a
    nested field (every data.*_key applies to every file the stage reads)."""
    response_key: str = "response"
    """Column holding the SFT response (a string or assistant messages)."""
    messages_key: str = "messages"
    """Column holding a whole SFT conversation (a message list)."""
    chosen_key: str = "chosen"
    """Column holding the preferred completion (a string or messages)."""
    rejected_key: str = "rejected"
    """Column holding the dispreferred completion (a string or messages)."""
    answer_key: str = "answer"
    """Column holding an RL prompt's reference answer, e.g. reward_model.ground_truth for
    verl's Parquet files; when set to another name the column must be present and non-null."""
    max_length: int = 128
    """Tokens per sample (prompt + response); every batch is padded to this length."""
    truncation: Literal["error", "right", "drop"] = "error"
    """A sample longer than max_length: fail with file:line (or row), cut its end, or drop it."""
    on_error: Literal["error", "skip"] = "error"
    """A malformed line or row (or a preference pair whose chosen equals its rejected):
    fail naming file:line (or file row N) and column, or skip it and count it by reason."""

    def __post_init__(self):
        if self.max_length < 2:
            raise ConfigError(f"data.max_length = {self.max_length}: must be >= 2")
        for key, column in self.columns().items():
            if not column or column.startswith(".") or column.endswith(".") or ".." in column:
                raise ConfigError(
                    f"data.{key}_key = {column!r}: expected a column name, dotted for a nested field "
                    f"(e.g. reward_model.ground_truth); the default is {key!r}"
                )

    def columns(self) -> dict[str, str]:
        """Record key -> the column it is read from (data.prompt_key, ...)."""
        keys = ("prompt", "response", "messages", "chosen", "rejected", "answer")
        return {k: getattr(self, f"{k}_key") for k in keys}


def even_microbatch_size(rows: int, at_most: int) -> int:
    """The largest microbatch size <= at_most that splits `rows` into equal microbatches:
    what pipeline parallelism needs (stages exchange one activation shape)."""
    return max(d for d in range(1, max(1, min(at_most, rows)) + 1) if rows % d == 0)


def forward_microbatch_rows(rows: int, micro_batch: int, forward_micro_batch: int, pipelined: bool) -> int:
    """Rows per forward-only microbatch when one rank scores `rows` rows:
    forward_micro_batch (0 = micro_batch); under pipeline parallelism the largest size up
    to it that splits the rows evenly."""
    size = forward_micro_batch or micro_batch
    return even_microbatch_size(rows, size) if pipelined else size


@dataclass
class RunConfig:
    """Schedule and bookkeeping of a training run."""

    run_dir: str = "runs/default"
    """Everything the run writes: config.yaml, metrics.jsonl, checkpoints/, logs/, plots/."""
    seed: int = 1234
    """Seed for weights, data order and dropout (same on every rank)."""
    max_steps: int = 100
    """Optimizer steps to train."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one data-parallel rank."""
    forward_micro_batch_size: int = 0
    """Sequences per forward-only pass on one data-parallel rank: scoring by the reference,
    reward model and critic, log-prob recomputes, DPO's precomputed reference, evaluation
    (0 = micro_batch_size). Such passes keep no activations for a backward, so they can
    take several times more rows (verl's log_prob_micro_batch_size)."""
    compile: bool = False
    """Run the models' forward passes (and the trained models' backward) through
    torch.compile (Inductor, dynamic shapes: one graph for every microbatch length): the
    trained models, and the frozen reference and reward models that score rollouts or
    preference pairs. The first step pays the compile (20-90 s per model on a 2-core CPU;
    a forward-only pass of a trained model is one more graph), later steps skip the
    per-op Python of Megatron's layers and run fused elementwise kernels (fwd+bwd of the
    examples' 0.6M model: ~28% less time on CPU, a frozen forward ~30%). Needs
    pipeline-parallel size 1 and no activation recompute for every model it compiles; at
    TP>1 Megatron's column-parallel linears (an asynchronous all-reduce in their
    backward) stay outside the compiled graphs, so the gain is smaller."""
    global_batch_size: int = 32
    """Sequences per optimizer step over all data-parallel ranks (a multiple of
    micro_batch_size * dp; the rest is gradient accumulation). PPO and GRPO: prompts per
    iteration."""
    logging_steps: int = 10
    """Print a metrics line every this many steps (metrics.jsonl gets every step)."""
    eval_steps: int = 50
    """Evaluate every this many steps (and at the end); 0 = only at the end."""
    save_steps: int = 0
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""
    save_total_limit: int = 2
    """Keep the newest this many checkpoints."""
    dump_rollouts: int = 0
    """PPO, GRPO: write every this-many-th iteration's batch (texts, ids, masks, scores,
    rewards, advantages, engine and trainer log-probs, IS weights, policy version) to
    run_dir/rollouts/iter_N.parquet, for `--replay-rollouts` (0 = never)."""
    max_skipped_steps: int = 3
    """Optimizer steps with a non-finite loss or gradient norm are skipped (not applied,
    optimizer state untouched) and logged; this many in a row (per trained model) stop
    the run with exit code 4, naming the first bad step and the last finite checkpoint."""
    on_save_error: Literal["stop", "continue"] = "stop"
    """A checkpoint that cannot be written (disk full, permissions, I/O error): 'stop' =
    exit code 3 with the directory and its free space named; 'continue' = say so and keep
    training (the previous checkpoint stays the latest)."""

    def __post_init__(self):
        if self.max_steps < 1:
            raise ConfigError(f"train.max_steps = {self.max_steps}: must be >= 1")
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
        if self.forward_micro_batch_size < 0:
            raise ConfigError(
                f"train.forward_micro_batch_size = {self.forward_micro_batch_size}: must be >= 0 (0 = micro_batch_size)"
            )
        # global_batch_size vs micro_batch_size * dp is checked where dp is known (and for
        # GRPO global_batch_size counts prompts, each with num_generations sequences).
        if self.dump_rollouts < 0:
            raise ConfigError(f"train.dump_rollouts = {self.dump_rollouts}: must be >= 0 (0 = never)")
        if self.save_total_limit < 1:
            raise ConfigError("train.save_total_limit must be >= 1")
        if self.max_skipped_steps < 1:
            raise ConfigError(f"train.max_skipped_steps = {self.max_skipped_steps}: must be >= 1")

    def forward_micro_batch(self, rows: int, pipelined: bool) -> int:
        """Rows per forward-only microbatch when one rank scores `rows` rows
        (`forward_microbatch_rows`)."""
        return forward_microbatch_rows(rows, self.micro_batch_size, self.forward_micro_batch_size, pipelined)

    def num_microbatches(self, dp: int) -> int:
        """Gradient-accumulation steps per optimizer step on each DP rank."""
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size = {self.global_batch_size} is not a multiple of "
                f"micro_batch_size * dp = {self.micro_batch_size} * {dp}: change one of them"
            )
        return self.global_batch_size // per_step


def check_compile(cfg) -> None:
    """train.compile compiles every model of a stage, each at its own layout: all of them
    need pipeline-parallel size 1 (no p2p tensors between microbatches) and the policy
    no activation recompute (a forward replayed inside backward). Raises ConfigError."""
    if not cfg.train.compile:
        return
    if cfg.model.recompute != "none":
        raise ConfigError(
            f"train.compile with model.recompute = {cfg.model.recompute!r}: compiled models cannot replay "
            "their forward in backward; set model.recompute=none (or train.compile=false)"
        )
    for f in fields(cfg):
        layout = getattr(cfg, f.name)
        if isinstance(layout, RoleLayoutConfig):
            layout = LayoutConfig(*layout.resolve(cfg.layout))
        if isinstance(layout, LayoutConfig) and layout.pp > 1:
            raise ConfigError(
                f"train.compile needs pipeline-parallel size 1 for every model it compiles; {f.name}.pp = "
                f"{layout.pp}: set {f.name}.pp=1 or train.compile=false"
            )
