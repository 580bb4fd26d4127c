"""Model shapes for the planner: presets, config/HF folders, per-rank parameters, FLOPs.

Layer: plan/ (pure Python over `ModelConfig`; reading a Hugging Face folder imports
`checkpoint.hf` lazily). Counts follow `megarlhf.models.backbone`: the vocabulary is padded
to `make_vocab_size_divisible_by` (not to a TP multiple), matmul weights and the
QKV / fc1 biases are split over TP, norms and the remaining biases are replicated, the
embedding (and learned positions) sit on the first pipeline stage, the final norm and the
output layer (or the value head) on the last one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megarlhf.config import ModelConfig
from megarlhf.config.errors import ConfigError

_LLAMA3 = dict(arch="llama", vocab_size=128256, rope_theta=500000.0, max_seq_length=8192, params_dtype="bfloat16")
PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                             ffn_hidden_size=14336, **_LLAMA3),
    "llama3-70b": ModelConfig(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                              ffn_hidden_size=28672, **_LLAMA3),
    "llama3-405b": ModelConfig(num_layers=126, hidden_size=16384, num_attention_heads=128, num_query_groups=8,
                               ffn_hidden_size=53248, **_LLAMA3),
    "qwen2-72b": ModelConfig(arch="llama", num_layers=80, hidden_size=8192, num_attention_heads=64,
                             num_query_groups=8, ffn_hidden_size=29568, vocab_size=152064, add_qkv_bias=True,
                             rope_theta=1000000.0, max_seq_length=32768, norm_eps=1e-6, params_dtype="bfloat16"),
    # OpenRLHF's published 70B PPO row trained Llama-2-70B (32k vocabulary, 4k context).
    "llama2-70b": ModelConfig(arch="llama", num_layers=80, hidden_size=8192, num_attention_heads=64,
                              num_query_groups=8, ffn_hidden_size=28672, vocab_size=32000, max_seq_length=4096,
                              params_dtype="bfloat16"),
}  # fmt: skip
PRESETS["llama3.1-405b"] = PRESETS["llama3-405b"]


def load_shape(spec: str) -> ModelConfig:
    """A preset name, a Hugging Face model folder (its config.json), or a megarlhf run /
    YAML config whose `model:` section describes the shape."""
    key = spec.lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        from megarlhf.checkpoint.hf import model_config_from_hf, read_hf_config

        return model_config_from_hf(read_hf_config(path), params_dtype="bfloat16").config
    if path.is_dir() and (path / "config.yaml").is_file():
        path = path / "config.yaml"
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        import yaml

        from megarlhf.config.loader import load_config

        section = (yaml.safe_load(path.read_text()) or {}).get("model")
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: no 'model:' section to read the shape from")

        @dataclasses.dataclass
        class _Shape:
            model: ModelConfig = dataclasses.field(default_factory=ModelConfig)

        return load_config(_Shape, None, [f"model.{k}={v}" for k, v in section.items()]).model
    raise ConfigError(
        f"model {spec!r}: not a preset ({', '.join(sorted(PRESETS))}), a Hugging Face folder with "
        "config.json, or a YAML config / run directory with a model: section"
    )


def _layer_parameters(cfg: ModelConfig, tp: int) -> int:
    """One transformer layer's parameters on one TP rank."""
    h, f = cfg.hidden_size, cfg.ffn_size
    kv = h // cfg.num_attention_heads * cfg.query_groups
    gpt = cfg.arch == "gpt"
    split = h * (h + 2 * kv) + h * h + h * f * (2 if gpt else 3)
    split += (h + 2 * kv) * (gpt or cfg.add_qkv_bias) + f * gpt  # QKV bias, fc1 bias: column-parallel
    replicated = 2 * h * (2 if gpt else 1) + 2 * h * gpt  # norms; proj and fc2 biases
    return split // tp + replicated


def stage_parameters(cfg: ModelConfig, tp: int, pp: int, head: str = "lm") -> list[int]:
    """Parameters held by one rank of each pipeline stage (its TP shard), first to last."""
    h, v = cfg.hidden_size, cfg.padded_vocab_size
    per_stage = cfg.num_layers // pp
    out = []
    for stage in range(pp):
        n = per_stage * _layer_parameters(cfg, tp)
        if stage == 0:
            n += v * h // tp + (cfg.max_seq_length * h if cfg.arch == "gpt" else 0)
        if stage == pp - 1:
            n += h * (2 if cfg.arch == "gpt" else 1)  # final norm
            if head == "value":
                n += h  # ValueHead [1, h], replicated
            elif not cfg.tie_embeddings or pp > 1:
                n += v * h // tp  # output layer (a tied one is a second copy under PP)
        out.append(n)
    return out


def matmul_parameters(cfg: ModelConfig, head: str = "lm") -> int:
    """Parameters that take part in a matmul per token: every layer's weights and the
    output layer (not the embedding lookup): the N of 2*N FLOPs per token and forward."""
    h, f = cfg.hidden_size, cfg.ffn_size
    kv = h // cfg.num_attention_heads * cfg.query_groups
    layer = h * (h + 2 * kv) + h * h + h * f * (2 if cfg.arch == "gpt" else 3)
    return cfg.num_layers * layer + (cfg.padded_vocab_size * h if head == "lm" else h)


def forward_flops(cfg: ModelConfig, tokens: float, context: float, head: str = "lm") -> float:
    """FLOPs of a forward pass over `tokens` tokens that attend to `context` keys on average
    (s/2 for causal training and scoring on length-s rows; the cache length in decode):
    2 x matmul parameters per token, plus QK^T and AV (4 x h x context per token and layer)."""
    return tokens * (2 * matmul_parameters(cfg, head) + 4 * cfg.num_layers * cfg.hidden_size * context)


def kv_bytes_per_token(cfg: ModelConfig, tp: int, dtype_bytes: int = 2) -> float:
    """KV cache bytes per token on one TP rank (keys and values of every layer)."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_layers * max(1, cfg.query_groups // tp) * head_dim * dtype_bytes


def describe(cfg: ModelConfig) -> str:
    return (
        f"{cfg.arch} L{cfg.num_layers} h{cfg.hidden_size} heads{cfg.num_attention_heads}/kv{cfg.query_groups} "
        f"ffn{cfg.ffn_size} vocab{cfg.padded_vocab_size} ({cfg.num_parameters() / 1e9:.2f}B)"
    )
