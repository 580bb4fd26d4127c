"""Confidence intervals of evaluation scores against published values and scipy, and the
generate command's config checks and best-of-n pick."""

from __future__ import annotations

import random

import pytest

from megarlhf.algorithms.intervals import bootstrap_interval, summarize_scores, wilson_interval
from megarlhf.config import ConfigError, GenerateConfig, load_config


@pytest.mark.parametrize(
    "k,n,low,high",
    [
        (7, 10, 0.3968, 0.8922),  # Wilson 95% for 7/10 (Newcombe 1998, Table I)
        (0, 10, 0.0, 0.2775),  # Wilson stays inside [0, 1] where Wald collapses to [0, 0]
        (10, 10, 0.7225, 1.0),
    ],
)
def test_wilson_interval_known_values(k, n, low, high):
    got = wilson_interval(k, n, 0.95)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_bootstrap_interval_close_to_t_interval():
    """For 400 roughly normal values the percentile bootstrap is within a few percent of
    the t-interval (scipy as the oracle)."""
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(1)
    values = [rng.gauss(3.0, 2.0) for _ in range(400)]
    mean = sum(values) / len(values)
    t_low, t_high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    low, high = bootstrap_interval(values, 0.95)
    assert low == pytest.approx(t_low, abs=0.05 * (t_high - t_low))
    assert high == pytest.approx(t_high, abs=0.05 * (t_high - t_low))


def test_summarize_scores_picks_the_method():
    one_each = summarize_scores([[1.0], [0.0], [1.0], [1.0]])
    assert one_each["accuracy"] == 0.75 and one_each["ci_method"] == "wilson"
    assert (one_each["ci_low"], one_each["ci_high"]) == pytest.approx(wilson_interval(3, 4))
    grouped = summarize_scores([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert grouped["accuracy"] == pytest.approx(0.5) and grouped["ci_method"] == "bootstrap over prompts"
    real = summarize_scores([[0.5], [1.5]])
    assert "accuracy" not in real and real["mean"] == 1.0


def test_generate_config_checks():
    base = ["model_path=ckpt", "prompts=p.jsonl"]
    assert load_config(GenerateConfig, None, base).output_path == "p.generated.jsonl"
    for bad, words in [
        (["layout.pp=2"], "tensor-parallel only"),
        (["n=4"], "temperature > 0"),
        (["best_of_n=true", "n=4", "temperature=1"], "scorer"),
        ([], None),
    ]:
        args = (base if bad else ["prompts=p.jsonl"]) + bad
        with pytest.raises(ConfigError, match=words or "model_path"):
            load_config(GenerateConfig, None, args)


def test_mark_best_takes_the_first_of_the_highest():
    pytest.importorskip("megatron.core")
    from megarlhf.generate import mark_best

    samples = [{"score": s} for s in (0.2, 0.9, 0.9, -1.0)]
    mark_best(samples)
    assert [r["best"] for r in samples] == [False, True, False, False]
