"""Rule-based reward functions and how they are named in configs. Layer: rollout/.

A reward function scores decoded responses: `fn(prompts, responses, answers) -> scores`,
all lists of equal length. Configs name one as `module:function`, e.g.
`megarlhf.data.synthetic:sort_reward_batch` or `my_pkg.rewards:exact_match`, or by a
short name from `BUILTIN_REWARDS` (the verifiable math rewards: `gsm8k`, `math`, ...).
A score may be None: that sample is left out of the loss. A NaN/inf score or an
exception stops the run (`checked_scores`).
"""

from __future__ import annotations

import importlib
import math
import traceback
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megarlhf.config import ConfigError


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], responses: list[str], answers: list[Any]) -> list[float | None]: ...


BUILTIN_REWARDS = {
    "gsm8k": "megarlhf.rollout.math_rewards:gsm8k_reward",
    "gsm8k_flexible": "megarlhf.rollout.math_rewards:gsm8k_flexible_reward",
    "boxed": "megarlhf.rollout.math_rewards:boxed_reward",
    "math": "megarlhf.rollout.math_rewards:math_reward",
    "math_format": "megarlhf.rollout.math_rewards:format_reward",
}
"""Short names of the rule rewards that ship with megarlhf (rollout/math_rewards.py)."""


def load_reward_fn(spec: str) -> RewardFn:
    """'package.module:function' or a BUILTIN_REWARDS name -> the function, with errors
    that say what to fix."""
    spec = BUILTIN_REWARDS.get(spec, spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"reward function {spec!r}: expected 'module:function' or one of {sorted(BUILTIN_REWARDS)}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"reward function {spec!r}: cannot import {module_name} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {module_name} has no callable {attr!r}")
    return fn


class RewardError(RuntimeError):
    """A reward function that raised or returned a non-finite score (the run stops)."""


def checked_scores(fn: RewardFn, name: str, prompts: list[str], responses: list[str], answers: list[Any], where: list[str]) -> torch.Tensor:
    """`fn`'s scores as float64 [N]: NaN where it returned None (that sample is left out
    of the loss, as TRL allows). Raises RewardError naming `name`, the sample (`where[i]`,
    e.g. "prompt 17") and the value when a score is NaN/inf or not a number, or naming
    the exception with its traceback when `fn` raises, or when it returns a list of the
    wrong length."""
    try:
        scores = fn(prompts, responses, answers)
    except Exception as err:
        raise RewardError(
            f"reward function {name} raised on the batch of {len(prompts)} samples starting at "
            f"{where[0] if where else '?'}: {type(err).__name__}: {err}\n{traceback.format_exc()}"
        ) from err
    scores = list(scores) if not torch.is_tensor(scores) else scores.tolist()
    if len(scores) != len(prompts):
        raise RewardError(f"reward function {name} returned {len(scores)} scores for {len(prompts)} samples")
    out = torch.empty(len(scores), dtype=torch.float64)
    for i, value in enumerate(scores):
        if value is None:
            out[i] = math.nan
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise RewardError(
                f"reward function {name} returned {value!r} for {where[i]} (prompt {prompts[i][:80]!r}): "
                f"scores must be finite numbers, or None to leave a sample out of the loss"
            )
        out[i] = number
    return out


def agree_on_failure(message: str | None, device: torch.device | str) -> None:
    """Collective over the world, after each rank scored its own samples: raise
    RewardError on every rank when any failed (the failing rank's message on that rank),
    so that no rank waits in the next collective for one that stopped."""
    flag = torch.tensor([0.0 if message is None else 1.0], device=device)
    dist.all_reduce(flag)
    if message is not None:
        raise RewardError(message)
    if flag.item():
        raise RewardError("the reward function failed on another rank (its message names the sample)")
