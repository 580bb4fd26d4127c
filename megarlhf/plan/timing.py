"""Seconds per phase from FLOPs and bytes, with a few named efficiency factors.

Layer: plan/ (pure Python). Every phase is bound by arithmetic, memory traffic or links:
- training and scoring: FLOPs (2 x matmul parameters x tokens per forward, 3x for
  forward + backward, 4x with full recompute, plus causal attention) at `mfu` of the
  GPUs' peak, stretched by the pipeline bubble (1 + (pp - 1) / microbatches);
- decode: each step streams the engine's weights and KV cache from HBM (`hbm` of its
  bandwidth) unless the batch makes it compute-bound, plus a fixed per-step cost
  (`decode_step_s`: launches, sampling, host sync) and, under TP, two all-reduces per layer
  (`latency_s` each);
- collectives and transfers: bytes over NVLink / network / PCIe at `comm` of the link.
Response lengths are random: a static batch decodes until its longest response, and a
whole batch trains padded to its longest row, so expected maxima of the length
distribution (`expected_max_length`) enter the step time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

from megarlhf.config import ModelConfig
from megarlhf.plan.hardware import GPU
from megarlhf.plan.shapes import forward_flops, kv_bytes_per_token, stage_parameters


@dataclass(frozen=True)
class Efficiency:
    """The named factors; one set for every framework, GPU and calibration row. The
    defaults are the values `plan.peers.fit()` finds on the five published peer rows
    (tests/unit/test_plan.py re-fits and compares)."""

    mfu: float = 0.29
    """Fraction of peak bf16 FLOP/s reached by transformer forward/backward (training and
    scoring passes, TP all-reduces and pipeline bubbles counted apart). Fitted."""
    hbm: float = 0.66
    """Fraction of HBM bandwidth reached while a decode step streams weights + KV cache.
    Fitted."""
    decode_step_s: float = 9.1e-3
    """Fixed cost of one decode step outside the matmuls and TP collectives: kernel
    launches, sampling, host synchronisation of the peers' engines (TRT-LLM, vLLM as of
    2024) driven from Python. Fitted. megarlhf's engine, which also samples every row on
    the GPU within the step, is costed with the same value."""
    comm: float = 0.80
    """Fraction of a link's bandwidth large collectives reach (NCCL all-reduce/all-gather
    bus bandwidth over the link rate, from nccl-tests). Fixed, not fitted."""
    latency_s: float = 15e-6
    """Latency of one small all-reduce inside a TP group (decode's per-layer all-reduces
    of a few KB). Fixed from NCCL's intra-node small-message latency, not fitted."""

    FITTED = ("mfu", "hbm", "decode_step_s")

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --- response lengths ----------------------------------------------------------------------
LENGTH_SHAPE = 2
"""Response lengths are modelled as Erlang-2 (a gamma with shape 2: coefficient of
variation 0.71), truncated at the response-length limit, with the mean a row reports. An
assumption: the peers publish means only, and chat responses are less skewed than an
exponential (shape 1) but far from constant."""


def _erlang_sf(x: float, scale: float, k: int = LENGTH_SHAPE) -> float:
    """P(X > x) for an Erlang-k with the given scale."""
    z = x / scale
    return math.exp(-z) * sum(z**i / math.factorial(i) for i in range(k))


def _integrate(f, lo: float, hi: float, n: int = 400) -> float:
    """Simpson's rule."""
    if hi <= lo:
        return 0.0
    n += n % 2
    h = (hi - lo) / n
    s = f(lo) + f(hi) + sum((4 if i % 2 else 2) * f(lo + i * h) for i in range(1, n))
    return s * h / 3


@functools.lru_cache(maxsize=4096)
def _scale_for_mean(mean: float, cap: float) -> float:
    """Scale whose truncated mean E[min(X, cap)] equals `mean` (bisection)."""
    lo, hi = mean / (4 * LENGTH_SHAPE), 1e3 * cap
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        if _integrate(lambda x: _erlang_sf(x, mid), 0, cap, 200) < mean:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


@functools.lru_cache(maxsize=4096)
def expected_max_length(mean: float, cap: float, n: int) -> float:
    """E[max of n responses], lengths truncated at `cap` with truncated mean `mean`."""
    if n <= 1:
        return mean
    if mean >= cap * 0.999:
        return cap
    scale = _scale_for_mean(mean, cap)
    return _integrate(lambda x: 1 - (1 - _erlang_sf(x, scale)) ** n, 0, cap)


# --- compute-bound phases ------------------------------------------------------------------
def pass_seconds(cfg: ModelConfig, gpu: GPU, eff: Efficiency, *, tokens: float, seq: float, gpus: int,
                 backward: bool, recompute: str = "none", pp: int = 1, microbatches: int = 1,
                 head: str = "lm") -> float:  # fmt: skip
    """Forward (+ backward) over `tokens` tokens in rows of `seq`, spread over `gpus` GPUs.

    Backward costs twice the forward; full recompute adds one more forward. The 1F1B
    pipeline bubble idles (pp - 1) of every (microbatches + pp - 1) slots."""
    fwd = forward_flops(cfg, tokens, seq / 2, head)  # causal: keys attended average s/2
    flops = fwd * ((4 if recompute == "full" else 3) if backward else 1)
    bubble = 1 + (pp - 1) / max(1, microbatches)
    return flops / (gpus * gpu.bf16_flops * eff.mfu) * bubble


def optimizer_seconds(params_per_gpu: float, gpu: GPU, eff: Efficiency) -> float:
    """Adam step on this rank's shard: reads/writes ~36 bytes per parameter (bf16 weight,
    fp32 grad, main copy, two moments) at HBM speed."""
    return params_per_gpu * 36 / (gpu.hbm_bytes_per_s * eff.hbm)


# --- decode --------------------------------------------------------------------------------
def decode_step_seconds(cfg: ModelConfig, gpu: GPU, eff: Efficiency, *, tp: int, batch: int,
                        context: float, weight_bytes: float | None = None) -> float:  # fmt: skip
    """One decode step of `batch` rows that attend to `context` cached tokens, on one TP group."""
    if weight_bytes is None:
        weight_bytes = stage_parameters(cfg, tp, 1)[0] * 2
    memory = (weight_bytes + batch * context * kv_bytes_per_token(cfg, tp)) / (gpu.hbm_bytes_per_s * eff.hbm)
    compute = forward_flops(cfg, batch, context) / tp / (gpu.bf16_flops * eff.mfu)
    collectives = 2 * cfg.num_layers * eff.latency_s if tp > 1 else 0.0
    return max(memory, compute) + eff.decode_step_s + collectives


def prefill_seconds(cfg: ModelConfig, gpu: GPU, eff: Efficiency, *, tp: int, batch: int, prompt: float) -> float:
    compute = forward_flops(cfg, batch * prompt, prompt / 2) / tp / (gpu.bf16_flops * eff.mfu)
    memory = stage_parameters(cfg, tp, 1)[0] * 2 / (gpu.hbm_bytes_per_s * eff.hbm)
    return max(compute, memory)


def generate_seconds(cfg: ModelConfig, gpu: GPU, eff: Efficiency, *, tp: int, batch: int, rounds: int,
                     prompt: float, mean_response: float, max_response: int, rows_waited: int | None = None,
                     extra_steps: float = 0.0) -> tuple[float, float]:  # fmt: skip
    """`rounds` static batches of `batch` rows on one engine replica; a round ends when the
    longest of `rows_waited` responses (default: the batch) is done, after `extra_steps`
    more steps (prompt positions fed one at a time). Returns (seconds, decode steps per round)."""
    steps = extra_steps + expected_max_length(mean_response, max_response, rows_waited or batch)
    step = decode_step_seconds(cfg, gpu, eff, tp=tp, batch=batch, context=prompt + steps / 2)
    per_round = prefill_seconds(cfg, gpu, eff, tp=tp, batch=batch, prompt=prompt) + steps * step
    return rounds * per_round, steps


# --- links ---------------------------------------------------------------------------------
def link_bytes_per_s(gpu: GPU, group_size: int, gpus_per_node: int) -> float:
    """Per-GPU bandwidth of a collective over `group_size` consecutive ranks: NVLink inside
    a node, the NICs once the group spans nodes."""
    return gpu.nvlink_bytes_per_s if group_size <= gpus_per_node else gpu.network_bytes_per_s


def allreduce_seconds(nbytes: float, n: int, bandwidth: float, eff: Efficiency) -> float:
    """Ring all-reduce (or reduce-scatter + all-gather) of `nbytes` over n ranks."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (bandwidth * eff.comm)


def allgather_seconds(nbytes: float, n: int, bandwidth: float, eff: Efficiency) -> float:
    """All-gather (or reduce-scatter) whose result is `nbytes` per rank."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / (bandwidth * eff.comm)
