"""Per-GPU memory of one role: weights, gradients, optimizer states, activations, KV cache.

Layer: plan/ (pure Python). Byte counts follow what megarlhf allocates:
- weights in `params_dtype`; Megatron DDP keeps one contiguous fp32 gradient buffer
  (`grad_reduce_in_fp32=True` in engine/schedule.py), 4 bytes per parameter;
- Adam through Megatron's optimizer: fp32 main copy + exp_avg + exp_avg_sq = 12 bytes
  per parameter with bf16/fp16 weights, 8 with fp32 weights (the weights are the main
  copy); the distributed optimizer shards them over the role's data-parallel ranks;
- activations saved for backward per layer and token, counted tensor by tensor (see
  `layer_activation_elements`), for the stage that holds the most: the first stage holds
  min(pp, microbatches) microbatches in flight under 1F1B;
- the loss head (log-probs and entropy over the vocab-parallel logits,
  models/logprobs.py) saves probs and shifted logits in fp32 and briefly holds ~3 more
  [tokens, V/tp] fp32 tensors;
- the rollout engine's static KV cache: rows x (longest prompt + response_length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megarlhf.config import ModelConfig
from megarlhf.plan.shapes import kv_bytes_per_token, stage_parameters

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

Recompute = Literal["none", "selective", "full"]
Impl = Literal["gpu", "cpu"]

# GPU-only costs no formula sees: the CUDA context and cuBLAS/cuDNN workspaces (~0.6 GiB),
# NCCL communicators (megarlhf builds TP/PP/DP groups for each role: a few hundred MiB)
# and the caching allocator's fragmentation of the dynamic part. Not measurable on CPU;
# set from PyTorch/NCCL defaults and kept deliberately round.
RUNTIME_OVERHEAD_BYTES = 3.0 * GIB
FRAGMENTATION = 0.10
# Loss head: probs + shifted (saved) + exp*shifted, grad, log_p (transient), in fp32.
LOSS_HEAD_FP32_COPIES = 5


def layer_activation_elements(cfg: ModelConfig, tp: int, *, sequence_parallel: bool = False, impl: Impl = "gpu") -> float:
    """Elements one transformer layer saves for backward, per token, on one TP rank.

    Llama block (the terms are additive, each one tensor autograd keeps):
      norm input + normalised output, twice (attention and MLP)      2h + 2h
        (torch's CPU rms_norm is composite: it also keeps x * rstd: +1h per norm)
      QKV projection output (v stays a view of it)                    (h + 2 kv) / tp
      q and k after RoPE                                              (h + kv) / tp
      attention output (flash/SDPA; it is the out-projection's input)  h / tp
      fc1 output [gate; up] + SwiGLU output (fc2's input)            (2f + f) / tp
        (Megatron's local GLU on CPU also keeps silu(gate) and a copy of up: +2f)
    Sequence parallelism splits the h-sized terms over TP as well. Flash attention keeps
    no [s, s] scores, so selective recompute of core attention saves nothing more here.
    Checked against the tensors torch's autograd saves (tests/unit/test_plan.py).
    """
    h, f = cfg.hidden_size, cfg.ffn_size
    kv = h // cfg.num_attention_heads * cfg.query_groups
    norm_terms = 2 * (3 if impl == "cpu" else 2) * h
    if sequence_parallel and tp > 1:
        norm_terms /= tp
    rope = (h + kv) if cfg.arch == "llama" else 0
    attn = (h + 2 * kv) + rope + h
    if cfg.arch == "llama":
        mlp = (5 if impl == "cpu" else 3) * f
    else:
        mlp = 2 * f
    return norm_terms + (attn + mlp) / tp


@dataclass
class Activations:
    """Peak activation bytes of a training step on the rank that holds the most."""

    layers: float
    """Saved layer activations of the microbatches in flight."""
    head: float
    """Final norm + loss head (last stage)."""

    @property
    def total(self) -> float:
        return self.layers + self.head


def training_activations(
    cfg: ModelConfig, tp: int, pp: int, *, micro_batch: int, seq: int, microbatches: int,
    recompute: Recompute = "none", sequence_parallel: bool = False, head: str = "lm", impl: Impl = "gpu",
    dtype_bytes: int | None = None,
) -> Activations:  # fmt: skip
    """Peak saved activations of forward/backward over `microbatches` microbatches of
    [micro_batch, seq] tokens. The first stage holds min(pp, microbatches) microbatches of
    its L/pp layers under 1F1B; the last stage one microbatch plus the loss head."""
    e = dtype_bytes or DTYPE_BYTES[cfg.params_dtype]
    tokens = micro_batch * seq
    per_layer = layer_activation_elements(cfg, tp, sequence_parallel=sequence_parallel, impl=impl) * tokens * e
    if recompute == "full":
        # Each layer keeps its input; backward rebuilds one layer's activations at a time.
        h = cfg.hidden_size / (tp if sequence_parallel and tp > 1 else 1)
        layer_input = h * tokens * e
        stage_layers = cfg.num_layers // pp
        live = lambda n_mb: n_mb * stage_layers * layer_input + per_layer  # noqa: E731
    else:
        live = lambda n_mb: n_mb * (cfg.num_layers // pp) * per_layer  # noqa: E731
    first = live(min(pp, microbatches))
    norm = (3 if impl == "cpu" else 2) * cfg.hidden_size * tokens * e
    if head == "lm":
        loss = LOSS_HEAD_FP32_COPIES * tokens * cfg.padded_vocab_size / tp * 4
    else:
        loss = 0.0
    last = live(1) + norm + loss
    if pp == 1:
        return Activations(layers=first, head=norm + loss)
    return Activations(layers=first, head=0.0) if first >= last else Activations(layers=live(1), head=norm + loss)


def scoring_activations(cfg: ModelConfig, tp: int, *, micro_batch: int, seq: int, head: str = "lm",
                        dtype_bytes: int | None = None) -> float:  # fmt: skip
    """Transient bytes of a forward-only pass: no activations are kept, so the peak is one
    layer's working set (~ the training layer's tensors) plus the logits and the
    log-prob/entropy temporaries (4 fp32 copies of [tokens, V/tp]) on the last stage."""
    e = dtype_bytes or DTYPE_BYTES[cfg.params_dtype]
    tokens = micro_batch * seq
    layer = layer_activation_elements(cfg, tp) * tokens * e
    logits = tokens * cfg.padded_vocab_size / tp * (e + 4 * 4) if head == "lm" else 0.0
    return layer + logits


@dataclass
class ModelStates:
    """Bytes one rank keeps for one role between steps."""

    weights: float
    grads: float = 0.0
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def model_states(cfg: ModelConfig, tp: int, pp: int, dp: int, *, head: str = "lm", trainable: bool,
                 distributed_optimizer: bool = False) -> ModelStates:  # fmt: skip
    """Weights (+ fp32 grad buffer + Adam states when trainable) on the largest stage."""
    params = max(stage_parameters(cfg, tp, pp, head))
    e = DTYPE_BYTES[cfg.params_dtype]
    if not trainable:
        return ModelStates(weights=params * e)
    adam = 8 if e == 4 else 12
    return ModelStates(
        weights=params * e,
        grads=params * 4,
        optimizer=params * adam / (dp if distributed_optimizer else 1),
    )


def kv_cache_bytes(cfg: ModelConfig, tp: int, rows: int, tokens_per_row: int) -> float:
    """Static KV cache of the rollout engine on one TP rank (bf16/fp16 or fp32 like the weights)."""
    return rows * tokens_per_row * kv_bytes_per_token(cfg, tp, DTYPE_BYTES[cfg.params_dtype])


def prefill_logits_bytes(cfg: ModelConfig, rows: int, prompt_tokens: int) -> float:
    """The engine's prefill asks GPTModel for logits gathered over TP at every prompt
    position ([rows, prompt, V] in the weights' dtype), of which it uses the last one."""
    return rows * prompt_tokens * cfg.padded_vocab_size * DTYPE_BYTES[cfg.params_dtype]
