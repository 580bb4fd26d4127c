"""Rollout/trainer mismatch: its metrics and its importance-sampling corrections.

Layer: algorithms/ (pure torch; no config objects, no process groups, no host syncs).

The rollout engine samples token y_t and records its log-prob `engine_t`; the trainer, at
the same (pre-update) weights, computes `trainer_t` for the same token. In float32 with the
same kernels the two agree to ~1e-6; bf16, other kernels, batch shapes or a stale engine
make them differ, and then the samples come from a policy that is not the one trained
(Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
training"). With

    rho_t = exp(trainer_t - engine_t)                 per token
    rho_i = exp(sum_t (trainer_t - engine_t))         per sequence (the responses'
                                                      likelihood ratio, as in verl and TRL)

`mismatch_metrics` measures the gap and `rollout_is_weights` turns it into a detached
per-token weight for the policy loss:

    token_truncate     w_t = min(rho_t, C)            truncated IS, TIS (Yao et al. 2025)
    sequence_truncate  w_t = min(rho_i, C)            on every token of sequence i
    token_mask         w_t = rho_t if c_min <= rho_t <= c_max else 0    masked IS (ICEPOP,
                                                      Ling team 2025; verl's rollout_rs=token)
    sequence_mask      w_t = rho_i if c_min <= rho_i <= c_max else 0    (verl's seq mask)

Names follow TRL's `vllm_importance_sampling_mode`; verl calls truncation
`rollout_is: token|sequence` (cap `rollout_is_threshold`) and masking `rollout_rs`.
Everything is computed over the batch given (the replicated whole batch in the trainers);
all statistics are 0-d tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megarlhf.algorithms.kl import kl_penalty

PREFIX = "rollout_correction/"
# The band outside which a ratio counts as "far" in the metrics (1/1.25 = 0.8).
RATIO_BAND = (0.8, 1.25)
# |sum of log-ratios| of a sequence beyond this is clamped: exp(20) ~ 5e8 is already
# "masked / truncated" for any sensible bound, and exp(100) would overflow float32.
_MAX_SEQUENCE_LOG_RATIO = 20.0


def _token_log_ratio(trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> Tensor:
    """[B, T] trainer - engine, 0 outside the mask (padding may hold anything)."""
    return torch.where(mask.bool(), trainer_logprobs - engine_logprobs, 0)


def _sequence_log_ratio(trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> Tensor:
    """[B] sum over each row's tokens of trainer - engine, clamped to +-20."""
    summed = _token_log_ratio(trainer_logprobs, engine_logprobs, mask).sum(-1)
    return summed.clamp(-_MAX_SEQUENCE_LOG_RATIO, _MAX_SEQUENCE_LOG_RATIO)


def _outside(ratio: Tensor, low: float, high: float) -> Tensor:
    return ((ratio < low) | (ratio > high)).to(ratio.dtype)


@torch.no_grad()
def mismatch_metrics(trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the engine's sampling policy is from the trainer's, [B, T] -> 0-d stats.

    Token statistics are means over the masked tokens, sequence statistics over the rows
    with at least one masked token:

        token_ratio_mean / _max           rho_t (1 = no gap)
        token_ratio_outside               fraction of tokens with rho_t outside [0.8, 1.25]
        seq_ratio_mean / _max / _outside  the same for rho_i
        k3_kl                             KL(engine || trainer) on the sampled tokens,
                                          Schulman's k3 with x ~ engine: rho - 1 - log rho
                                          (>= 0, unbiased; 0 = no gap)
        token_mult_prob_error             mean of exp(|trainer_t - engine_t|) (NeMo-RL's
                                          name; 1 = no gap, 1.01 = probabilities 1% apart)
        logprob_abs_diff_max              max |trainer_t - engine_t|
    """
    live = mask.bool()
    n_tokens = mask.sum()
    log_ratio = _token_log_ratio(trainer_logprobs, engine_logprobs, mask)
    ratio = log_ratio.exp()
    rows = live.any(-1)
    seq_ratio = _sequence_log_ratio(trainer_logprobs, engine_logprobs, mask).exp()[rows]
    low, high = RATIO_BAND

    def token_mean(x: Tensor) -> Tensor:
        return torch.where(live, x, 0).sum() / n_tokens

    def token_max(x: Tensor) -> Tensor:
        return torch.where(live, x, -torch.inf).amax()

    stats = {
        "token_ratio_mean": token_mean(ratio),
        "token_ratio_max": token_max(ratio),
        "token_ratio_outside": token_mean(_outside(ratio, low, high)),
        "seq_ratio_mean": seq_ratio.mean(),
        "seq_ratio_max": seq_ratio.amax() if seq_ratio.numel() else seq_ratio.new_tensor(torch.nan),
        "seq_ratio_outside": _outside(seq_ratio, low, high).mean(),
        # kl_penalty(p, q, "k3") estimates KL(p || q) for x ~ p: here p = engine (the sampler).
        "k3_kl": token_mean(kl_penalty(engine_logprobs.where(live, 0), trainer_logprobs.where(live, 0), "k3")),
        "token_mult_prob_error": token_mean(log_ratio.abs().exp()),
        "logprob_abs_diff_max": token_max(log_ratio.abs()),
    }
    return {PREFIX + k: v for k, v in stats.items()}


def _truncate(ratio: Tensor, cap: float, c_min: float, c_max: float) -> tuple[Tensor, Tensor]:
    return ratio.clamp(max=cap), ratio > cap


def _mask(ratio: Tensor, cap: float, c_min: float, c_max: float) -> tuple[Tensor, Tensor]:
    dropped = (ratio < c_min) | (ratio > c_max)
    return torch.where(dropped, 0, ratio), dropped


# level -> (trainer, engine, mask) -> log-ratio [B, T] (a sequence's on each of its tokens)
_LEVELS = {
    "token": _token_log_ratio,
    "sequence": lambda t, e, m: _sequence_log_ratio(t, e, m).unsqueeze(-1).expand_as(m),
}
# how -> (ratio, cap, c_min, c_max) -> (weights, tokens the rule acted on)
_RULES = {"truncate": _truncate, "mask": _mask}

ROLLOUT_CORRECTIONS = ("none",) + tuple(f"{level}_{rule}" for level in _LEVELS for rule in _RULES)


@torch.no_grad()
def rollout_is_weights(
    trainer_logprobs: Tensor,
    engine_logprobs: Tensor,
    mask: Tensor,
    mode: str,
    cap: float = 2.0,
    c_min: float = 0.5,
    c_max: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Detached importance weights w [B, T] for the policy loss (0 outside the mask), and stats.

    mode: one of ROLLOUT_CORRECTIONS (see the module docstring); "none" gives all ones.
    cap: C of the truncating modes; [c_min, c_max]: the band of the masking modes.

    stats (means over the masked tokens):
        is_weight_mean    mean w_t
        masked_fraction   fraction of tokens given weight 0 by a masking mode
        truncated_fraction  fraction of tokens whose ratio a truncating mode capped at C
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout correction {mode!r} is unknown; use one of {ROLLOUT_CORRECTIONS}")
    if not (cap > 0 and 0 <= c_min < 1 < c_max):
        raise ValueError(f"need cap > 0 and c_min < 1 < c_max, got cap={cap}, c_min={c_min}, c_max={c_max}")
    live = mask.bool()
    n_tokens = mask.sum()
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    if mode == "none":
        weights = live.to(torch.float32)
        stats = {"is_weight_mean": zero + 1, "masked_fraction": zero, "truncated_fraction": zero}
        return weights, {PREFIX + k: v for k, v in stats.items()}
    level, rule = mode.split("_")
    ratio = _LEVELS[level](trainer_logprobs.float(), engine_logprobs.float(), mask).exp()
    weights, acted = _RULES[rule](ratio, cap, c_min, c_max)
    weights = torch.where(live, weights, 0)
    acted = (acted & live).float().sum() / n_tokens
    stats = {
        PREFIX + "is_weight_mean": weights.sum() / n_tokens,
        PREFIX + "masked_fraction": acted if rule == "mask" else zero,
        PREFIX + "truncated_fraction": acted if rule == "truncate" else zero,
    }
    return weights, stats
