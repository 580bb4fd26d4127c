"""Confidence intervals of evaluation scores. Layer: algorithms/ (stdlib math only).

- `wilson_interval`: accuracy (k successes of n independent trials), Wilson's score
  interval: unlike the normal (Wald) interval it stays inside [0, 1] and keeps its coverage
  near 0 and 1 and for small n.
- `bootstrap_interval`: the mean of any scores, percentile bootstrap over the given units
  (seeded, so a report is reproducible). With several samples per prompt, pass per-prompt
  means: the samples of one prompt are correlated, the prompts are the independent units.
"""

from __future__ import annotations

import math
import random
from statistics import NormalDist


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence = {confidence}: must be in (0, 1)")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for a proportion successes / trials."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"{successes} successes of {trials} trials: need 0 <= successes <= trials, trials >= 1")
    z = _z(confidence)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    values: list[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """(low, high) percentile-bootstrap interval of mean(values): the mean of `resamples`
    resamples with replacement, cut at the (1 - confidence) / 2 tails."""
    _z(confidence)
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = means[int(math.floor(tail * (resamples - 1)))]
    high = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return low, high


def summarize_scores(per_prompt: list[list[float]], confidence: float = 0.95) -> dict[str, float | str]:
    """Mean score with its interval, and accuracy when every score is 0 or 1.

    per_prompt[i]: the scores of prompt i's samples. One sample per prompt and 0/1 scores:
    Wilson over the prompts; otherwise a bootstrap over prompts of the per-prompt means.
    """
    flat = [s for scores in per_prompt for s in scores]
    if not flat:
        raise ValueError("no scores")
    out: dict[str, float | str] = {"mean": sum(flat) / len(flat), "prompts": len(per_prompt), "samples": len(flat)}
    binary = all(s in (0.0, 1.0) for s in flat)
    if binary and all(len(s) == 1 for s in per_prompt):
        k = int(sum(flat))
        out["ci_low"], out["ci_high"] = wilson_interval(k, len(flat), confidence)
        out["ci_method"] = "wilson"
    else:
        means = [sum(s) / len(s) for s in per_prompt if s]
        out["ci_low"], out["ci_high"] = bootstrap_interval(means, confidence)
        out["ci_method"] = "bootstrap over prompts"
    if binary:
        out["accuracy"] = out["mean"]
    out["confidence"] = confidence
    return out
