"""Model shape and numerics: the one description every role's backbone is built from.

Layer: config/ (imports nothing from megarlhf but `config.errors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megarlhf.config.errors import ConfigError

ARCHITECTURES = ("llama", "gpt")
ROPE_SCALINGS = ("none", "llama3")


@dataclass
class ModelConfig:
    """A decoder-only transformer, Llama-style or GPT-style."""

    arch: Literal["llama", "gpt"] = "llama"
    """'llama': RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases.
    'gpt': LayerNorm, GeLU, learned absolute positions, biases."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads (grouped-query attention); None = num_attention_heads (plain MHA)."""
    ffn_hidden_size: int | None = None
    """MLP width; None = 4*hidden (gpt) or Llama's rule: 2/3 * 4*hidden rounded up to 256."""
    vocab_size: int = 256
    """Tokenizer vocabulary size (before padding)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding/output rows are padded to a multiple of this (a fast matmul shape).
    It does not depend on TP, so one checkpoint loads at every TP; the padded rows are
    never sampled (their logits are masked)."""
    max_seq_length: int = 512
    """Longest sequence (prompt + response) the model sees; sizes learned positions."""
    rope_theta: float = 10000.0
    """RoPE base (llama only)."""
    rope_scaling: Literal["none", "llama3"] = "none"
    """RoPE frequency scaling (llama only). 'llama3': Llama 3.1/3.2's (HF rope_type
    'llama3'): frequencies whose wavelength exceeds 8192 tokens are divided by
    rope_scaling_factor, those under 2048 kept, those between interpolated. Megatron-Core
    fixes low_freq_factor = 1, high_freq_factor = 4, original_max_position_embeddings = 8192."""
    rope_scaling_factor: float = 8.0
    """With rope_scaling = 'llama3': the factor (HF's rope_scaling.factor; 8 in Llama 3.1,
    32 in Llama 3.2)."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm / LayerNorm."""
    tie_embeddings: bool = False
    """Share the input embedding with the LM head."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection only (Qwen2-style); gpt has all biases regardless."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP (RLHF usually keeps it off for exact log-probs)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_std: float = 0.02
    """Std of the normal weight init."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter / activation dtype of every role (actor, critic, reference, reward model,
    rollout engine). 'bfloat16': mixed precision with float32 main weights, gradient
    buffers, optimizer state, log-probs, values and losses (docs/precision.md); tested on
    CPU at every layout, but only faster on GPU."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (only meaningful with tp > 1)."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recompute: 'full' recomputes each layer in backward, 'selective'
    only core attention."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """'auto' uses Transformer Engine when it imports, else Megatron-Core's local spec."""
    attention_backend: Literal["sdpa", "unfused"] = "sdpa"
    """Local spec only: torch SDPA (flash/memory-efficient kernels) or Megatron's
    unfused DotProductAttention."""

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"model.arch = {self.arch!r}: expected one of {ARCHITECTURES}")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} = {getattr(self, name)}: must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size = {self.hidden_size} is not divisible by "
                f"model.num_attention_heads = {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.query_groups:
            raise ConfigError(
                f"model.num_attention_heads = {self.num_attention_heads} is not divisible by "
                f"model.num_query_groups = {self.query_groups}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} = {getattr(self, name)}: must be in [0, 1)")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError(f"model.rope_scaling = {self.rope_scaling!r}: expected one of {ROPE_SCALINGS}")
        if self.rope_scaling != "none" and self.arch != "llama":
            raise ConfigError(f"model.rope_scaling = {self.rope_scaling!r} needs RoPE: set model.arch = 'llama'")
        if self.rope_scaling_factor < 1.0:
            raise ConfigError(f"model.rope_scaling_factor = {self.rope_scaling_factor}: must be >= 1")
        if self.arch == "gpt" and self.max_seq_length > 1 << 16:
            raise ConfigError("model.max_seq_length: learned positions above 65536 are not supported")

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.arch == "gpt":
            return 4 * self.hidden_size
        # Llama: SwiGLU keeps the parameter count of a 4h GeLU MLP with 2/3 of the width.
        return 256 * -(-(8 * self.hidden_size // 3) // 256)

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return m * -(-self.vocab_size // m)

    def num_parameters(self, head: Literal["lm", "value"] = "lm") -> int:
        """Parameter count of the unsharded model (padded vocabulary)."""
        h, f, v = self.hidden_size, self.ffn_size, self.padded_vocab_size
        kv = h // self.num_attention_heads * self.query_groups
        bias = self.arch == "gpt"
        attn = h * (h + 2 * kv) + h * h
        attn += (h + 2 * kv) * (bias or self.add_qkv_bias) + h * bias
        mlp = h * f * (3 if self.arch == "llama" else 2) + (f + h) * bias
        norms = 2 * h * (2 if self.arch == "gpt" else 1)
        layer = attn + mlp + norms
        embed = v * h + (self.max_seq_length * h if self.arch == "gpt" else 0)
        final_norm = h * (2 if self.arch == "gpt" else 1)
        if head == "value":
            out = h  # ValueHead: one [1, h] weight, no bias
        else:
            out = 0 if self.tie_embeddings else v * h
        return embed + self.num_layers * layer + final_norm + out
