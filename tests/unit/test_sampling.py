"""Sampling against its definition: empirical frequencies vs the filtered softmax."""

import math

import pytest
import torch

from megarlhf.config import ConfigError
from megarlhf.rollout.sampling import SamplingParams, filter_logits, sample_tokens

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def expected_probs(logits, temperature, top_k, top_p):
    """Naive reference: sort, keep top-k, keep tokens until cumulative mass reaches p."""
    probs = [math.exp(v / temperature) for v in logits.tolist()]
    z = sum(probs)
    probs = [p / z for p in probs]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, mass = [], 0.0
    for rank, i in enumerate(order):
        if top_k and rank >= top_k:
            break
        if mass >= top_p:
            break
        keep.append(i)
        mass += probs[i]
    z = sum(probs[i] for i in keep)
    return torch.tensor([probs[i] / z if i in keep else 0.0 for i in range(len(probs))])


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8), (0.9, 5, 0.9)],
)
def test_empirical_distribution_matches_filtered_softmax(temperature, top_k, top_p):
    n = 20000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    draws = sample_tokens(LOGITS.expand(n, -1), params, gens)
    counts = torch.bincount(draws, minlength=len(LOGITS)).double()
    expected = expected_probs(LOGITS, temperature, top_k, top_p).double() * n
    assert counts[expected == 0].sum() == 0, "a filtered-out token was sampled"
    kept = expected > 0
    chi2 = (((counts[kept] - expected[kept]) ** 2) / expected[kept]).sum().item()
    dof = int(kept.sum()) - 1
    # 99.9th percentile of chi-square is below dof + 5*sqrt(2*dof) + 10 for these dof.
    assert chi2 < dof + 5 * math.sqrt(2 * dof) + 10, (chi2, dof)


def test_filter_keeps_the_token_that_crosses_top_p():
    out = filter_logits(torch.tensor([[3.0, 0.0, 0.0]]), top_k=0, top_p=0.5)
    assert torch.isfinite(out).tolist() == [[True, False, False]]
    out = filter_logits(torch.tensor([[1.0, 1.0, -5.0]]), top_k=0, top_p=0.6)
    assert torch.isfinite(out).tolist() == [[True, True, False]]


def test_greedy_and_per_sample_generators_are_reproducible():
    logits = torch.randn(4, 10)
    assert sample_tokens(logits, SamplingParams(temperature=0), []).tolist() == logits.argmax(-1).tolist()
    params = SamplingParams(temperature=1.0)
    a = sample_tokens(logits, params, [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)])
    b = sample_tokens(logits, params, [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)])
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=0)])
def test_bad_params(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw)
