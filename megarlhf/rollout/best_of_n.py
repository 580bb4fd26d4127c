"""Best-of-N (rejection) sampling: n responses per prompt, keep the best-scoring one.

Layer: rollout/. The inference-time search baseline: with a good reward function it
raises quality without any training, and it is how RLHF datasets are often bootstrapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from megarlhf.rollout.engine import GenerationEngine
from megarlhf.rollout.rewards import RewardFn
from megarlhf.rollout.sampling import SamplingParams


@dataclass
class BestOfN:
    best: list[list[int]]
    """Per prompt: the response ids with the highest score (first one on ties)."""
    best_scores: list[float]
    scores: torch.Tensor
    """[num_prompts, n] every sample's score."""


def best_of_n(
    engine: GenerationEngine,
    prompt_ids: list[list[int]],
    n: int,
    params: SamplingParams,
    reward_fn: RewardFn,
    decode: Callable[[list[int]], str],
    prompts_text: list[str],
    answers: list[Any] | None = None,
    seed: int = 0,
) -> BestOfN:
    """Generate n samples per prompt in one batch and keep the best by `reward_fn`.

    Sample j of prompt i uses seed (seed, i, j), so results do not depend on n's batching.
    """
    if n < 1:
        raise ValueError(f"n = {n}: must be >= 1")
    answers = answers if answers is not None else [None] * len(prompt_ids)
    flat = [p for p in prompt_ids for _ in range(n)]
    seeds = [hash((seed, i, j)) % 2**62 for i in range(len(prompt_ids)) for j in range(n)]
    out = engine.generate(flat, params, seeds)
    responses = [out.response_ids(k) for k in range(len(flat))]
    texts = [decode([t for t in r if t not in engine.eos_ids]) for r in responses]
    scores = torch.tensor(
        reward_fn([p for p in prompts_text for _ in range(n)], texts, [a for a in answers for _ in range(n)]),
        dtype=torch.float,
    ).view(len(prompt_ids), n)
    pick = scores.argmax(dim=1)
    return BestOfN(
        best=[responses[i * n + int(j)] for i, j in enumerate(pick)],
        best_scores=scores.max(dim=1).values.tolist(),
        scores=scores,
    )
