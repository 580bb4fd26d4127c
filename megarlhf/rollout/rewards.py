"""Rule-based reward functions and how they are named in configs. Layer: rollout/.

A reward function scores decoded responses: `fn(prompts, responses, answers) -> scores`,
all lists of equal length. Configs name one as `module:function`, e.g.
`megarlhf.data.synthetic:sort_reward_batch` or `my_pkg.rewards:exact_match`, or by a
short name from `BUILTIN_REWARDS` (the verifiable math rewards: `gsm8k`, `math`, ...).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from megarlhf.config import ConfigError


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], responses: list[str], answers: list[Any]) -> list[float]: ...


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
