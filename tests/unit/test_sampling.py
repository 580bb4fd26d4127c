"""Sampling against its definition: empirical frequencies vs the filtered softmax."""

import math

import pytest
import torch

from megarlhf.config import ConfigError
from megarlhf.rollout.sampling import SamplingParams, filter_logits, row_uniforms, sample_tokens

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
    uniforms = row_uniforms(list(range(n)), 1)[:, 0]  # one draw from each of n streams
    draws = sample_tokens(LOGITS.expand(n, -1), params, uniforms)
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


def test_one_stream_gives_the_filtered_softmax_at_every_step():
    """Successive draws of ONE seed's stream (as a sample sees them over its response)
    follow the distribution too, not just first draws of many seeds."""
    n = 20000
    params = SamplingParams(temperature=1.0, top_k=6)
    draws = sample_tokens(LOGITS.expand(n, -1), params, row_uniforms([7], n)[0])
    counts = torch.bincount(draws, minlength=len(LOGITS)).double()
    expected = expected_probs(LOGITS, 1.0, 6, 1.0).double() * n
    kept = expected > 0
    chi2 = (((counts[kept] - expected[kept]) ** 2) / expected[kept]).sum().item()
    assert counts[~kept].sum() == 0 and chi2 < 5 + 5 * math.sqrt(10) + 10, chi2


def test_inverse_cdf_boundaries():
    """u in [F(i-1), F(i)) draws token i; filtered (zero-probability) tokens never win."""
    logits = torch.tensor([[0.0, float("-inf"), 0.0, 0.0]]).expand(6, -1)  # 1/3 on tokens 0, 2, 3
    u = torch.tensor([0.0, 0.33, 1 / 3 + 1e-9, 0.66, 2 / 3 + 1e-9, 1 - 1e-12], dtype=torch.float64)
    assert sample_tokens(logits, SamplingParams(), u).tolist() == [0, 0, 2, 2, 3, 3]


def test_greedy_and_per_sample_streams_are_reproducible():
    logits = torch.randn(4, 10)
    assert sample_tokens(logits, SamplingParams(temperature=0), torch.empty(0)).tolist() == logits.argmax(-1).tolist()
    params = SamplingParams(temperature=1.0)
    u = row_uniforms([1, 2, 3, 4], 5)
    assert torch.equal(u, row_uniforms([1, 2, 3, 4], 5))
    # A row's stream depends on its seed only, not on which rows share the batch.
    assert torch.equal(u[2], row_uniforms([9, 3], 5)[1])
    assert torch.equal(sample_tokens(logits, params, u[:, 0]), sample_tokens(logits, params, u[:, 0].clone()))


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=0)])
def test_bad_params(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw)
