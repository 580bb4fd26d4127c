"""megarlhf.algorithms.group against naive per-group, per-token Python loops (float64).

Groups are `num_generations` consecutive rows. The references loop over groups and over
each row's response span only; they never call the function under test.
"""

import math
import random

import pytest
import torch

from megarlhf import algorithms as alg

TOL = dict(atol=1e-9, rtol=1e-9)


def close(a, b, **tol):
    a, b = (torch.as_tensor(v, dtype=torch.float64) for v in (a, b))
    torch.testing.assert_close(a, b, **(tol or TOL))


def scores_with_uniform_group(seed, num_prompts=4, g=4):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_prompts * g, generator=gen, dtype=torch.float64)
    scores[g : 2 * g] = 1.0  # one group of identical rewards
    return scores


def naive_group_stats(group):
    n = len(group)
    mean = sum(group) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in group) / (n - 1))  # unbiased
    return mean, std


# ---------------------------------------------------------------- grpo, rloo


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_advantages_match_naive(scale_by_std):
    g, eps = 4, 1e-6
    scores = scores_with_uniform_group(0, g=g)
    out = alg.grpo_advantages(scores, g, scale_by_std=scale_by_std, eps=eps)
    s = scores.tolist()
    expected = []
    for p in range(len(s) // g):
        group = s[p * g : (p + 1) * g]
        mean, std = naive_group_stats(group)
        for x in group:
            expected.append((x - mean) / (std + eps) if scale_by_std else x - mean)
    close(out, expected)
    assert torch.isfinite(out).all()
    assert (out[g : 2 * g] == 0).all()  # identical rewards: exactly 0, no nan


def test_grpo_std_is_unbiased():
    # Group [0, 2]: mean 1, unbiased std sqrt(2) (the biased one would be 1).
    out = alg.grpo_advantages(torch.tensor([0.0, 2.0], dtype=torch.float64), 2, eps=0.0)
    close(out, [-1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_rloo_advantages_match_naive():
    g = 3
    scores = scores_with_uniform_group(1, num_prompts=5, g=g)
    out = alg.rloo_advantages(scores, g)
    s = scores.tolist()
    expected = []
    for p in range(len(s) // g):
        group = s[p * g : (p + 1) * g]
        for i, x in enumerate(group):
            others = [y for j, y in enumerate(group) if j != i]
            expected.append(x - sum(others) / len(others))
    close(out, expected)
    assert (out[g : 2 * g] == 0).all()


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_single_sample_groups_give_zero(name):
    scores = torch.tensor([0.3, -2.0, 5.0], dtype=torch.float64)
    out = alg.GROUP_ADVANTAGE_ESTIMATORS[name](scores, 1)
    assert torch.equal(out, torch.zeros(3, dtype=torch.float64))


def test_estimator_table_and_no_grad():
    assert set(alg.GROUP_ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo"}
    scores = torch.randn(8, dtype=torch.float64, requires_grad=True)
    close(
        alg.GROUP_ADVANTAGE_ESTIMATORS["dr_grpo"](scores, 4),
        alg.grpo_advantages(scores, 4, scale_by_std=False),
    )
    for fn in alg.GROUP_ADVANTAGE_ESTIMATORS.values():
        assert not fn(scores, 4).requires_grad


@pytest.mark.parametrize(
    "fn", [alg.grpo_advantages, alg.rloo_advantages, alg.filter_uniform_groups]
)
def test_group_layout_is_checked(fn):
    with pytest.raises(ValueError, match="divisible by num_generations=4"):
        fn(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        fn(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="num_generations"):
        fn(torch.zeros(4), 0)


# ---------------------------------------------------------------- dynamic sampling


def test_filter_uniform_groups_matches_naive():
    g = 3
    scores = torch.tensor(
        [1, 1, 1, 0, 1, 0, 0, 0, 0, 0.5, 0.5, 0.25], dtype=torch.float64
    )
    keep = alg.filter_uniform_groups(scores, g)
    s = scores.tolist()
    expected = []
    for p in range(len(s) // g):
        group = s[p * g : (p + 1) * g]
        expected += [any(x != group[0] for x in group)] * g
    assert keep.dtype == torch.bool and keep.tolist() == expected
    assert expected == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3
    assert not alg.filter_uniform_groups(scores, 1).any()  # single samples are uniform


# ---------------------------------------------------------------- tokens


def make_mask(seed, b=6, t=9, empty_rows=(2,)):
    rng = random.Random(seed)
    spans = []
    for i in range(b):
        s = rng.randint(0, t - 1)
        spans.append((s, s) if i in empty_rows else (s, rng.randint(s + 1, t)))
    mask = torch.zeros(b, t, dtype=torch.float64)
    for i, (s, e) in enumerate(spans):
        mask[i, s:e] = 1.0
    return mask, spans


def test_broadcast_to_tokens_matches_naive():
    mask, spans = make_mask(0)
    adv = torch.randn(mask.size(0), dtype=torch.float64)
    out = alg.broadcast_to_tokens(adv, mask)
    expected = [[0.0] * mask.size(1) for _ in spans]
    for i, (s, e) in enumerate(spans):
        for j in range(s, e):
            expected[i][j] = adv[i].item()
    close(out, expected)
    assert out.dtype == adv.dtype and (out[2] == 0).all()


def naive_reinforce_pp(scores, kl, spans, t, kl_coef, gamma, eps):
    returns = [[0.0] * t for _ in spans]
    for i, (s, e) in enumerate(spans):
        for k in range(s, e):
            total = 0.0
            for u in range(k, e):  # closed form: sum of discounted future rewards
                r = -kl_coef * kl[i][u] + (scores[i] if u == e - 1 else 0.0)
                total += gamma ** (u - k) * r
            returns[i][k] = total
    values = [returns[i][k] for i, (s, e) in enumerate(spans) for k in range(s, e)]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)  # biased
    adv = [[0.0] * t for _ in spans]
    for i, (s, e) in enumerate(spans):
        for k in range(s, e):
            adv[i][k] = (returns[i][k] - mean) / math.sqrt(var + eps)
    return returns, adv


@pytest.mark.parametrize("kl_coef,gamma", [(0.0, 1.0), (0.05, 1.0), (0.1, 0.9)])
def test_reinforce_pp_matches_naive(kl_coef, gamma):
    mask, spans = make_mask(1)
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(mask.size(0), generator=gen, dtype=torch.float64)
    kl = torch.rand(mask.shape, generator=gen, dtype=torch.float64)
    kl = torch.where(mask.bool(), kl, float("nan"))  # padding is never read
    eps = 1e-8
    returns = alg.reinforce_pp_returns(scores, mask, kl, kl_coef, gamma)
    adv = alg.reinforce_pp_advantages(scores, mask, kl, kl_coef, gamma, eps=eps)
    ref_ret, ref_adv = naive_reinforce_pp(
        scores.tolist(), kl.tolist(), spans, mask.size(1), kl_coef, gamma, eps
    )
    close(returns, ref_ret)
    close(adv, ref_adv)
    assert (adv[2] == 0).all() and (returns[2] == 0).all()  # the all-masked row
    assert torch.isfinite(adv).all()


def test_reinforce_pp_without_kl_and_fully_masked_batch():
    mask, spans = make_mask(2, empty_rows=())
    scores = torch.randn(mask.size(0), dtype=torch.float64)
    _, ref_adv = naive_reinforce_pp(
        scores.tolist(), [[0.0] * mask.size(1)] * mask.size(0), spans, mask.size(1), 0.0, 1.0, 1e-8
    )
    close(alg.reinforce_pp_advantages(scores, mask), ref_adv)
    empty = torch.zeros_like(mask)
    assert torch.equal(alg.reinforce_pp_advantages(scores, empty), torch.zeros_like(mask))


def test_reinforce_pp_global_moments_over_a_split_equal_the_whole():
    # Data parallelism: each rank computes its returns, the (count, sum, sum of squares)
    # are all-reduced, and every rank normalises with the global moments.
    mask, _ = make_mask(3, b=8, empty_rows=(5,))
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(8, generator=gen, dtype=torch.float64)
    kl = torch.rand(mask.shape, generator=gen, dtype=torch.float64)
    whole = alg.reinforce_pp_advantages(scores, mask, kl, 0.1, 0.95)

    ranks = (slice(0, 3), slice(3, 4), slice(4, 8))
    n = s1 = s2 = 0.0
    for rows in ranks:
        ret = alg.reinforce_pp_returns(scores[rows], mask[rows], kl[rows], 0.1, 0.95)
        n += mask[rows].sum()
        s1 += (ret * mask[rows]).sum()
        s2 += (ret.square() * mask[rows]).sum()
    mean = s1 / n
    moments = (mean, s2 / n - mean.square())
    pieces = [
        alg.reinforce_pp_advantages(scores[r], mask[r], kl[r], 0.1, 0.95, moments=moments)
        for r in ranks
    ]
    close(torch.cat(pieces), whole)
