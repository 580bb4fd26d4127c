"""megarlhf.algorithms against naive per-row, per-token Python loops (float64).

Batches have rows with different prompt and response lengths (contiguous response span,
padding after); the references loop over each row's span only and never use the mask.
"""

import ast
import math
import pathlib
import random

import pytest
import torch

from megarlhf import algorithms as alg

TOL = dict(atol=1e-9, rtol=1e-9)


def make_batch(seed, b=5, t=9, garbage=0.0):
    """Random float64 fields, mask and spans [(start, end)]; padding filled with `garbage`."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    spans = []
    for _ in range(b):
        start = rng.randint(0, t - 1)
        spans.append((start, rng.randint(start + 1, t)))
    mask = torch.zeros(b, t, dtype=torch.float64)
    for i, (s, e) in enumerate(spans):
        mask[i, s:e] = 1.0

    def field(scale=1.0, shift=0.0):
        x = torch.randn(b, t, generator=g, dtype=torch.float64) * scale + shift
        return torch.where(mask.bool(), x, torch.full_like(x, garbage)) if garbage else x

    return mask, spans, field


def masked_elements(x, spans):
    return [x[i][j] for i, (s, e) in enumerate(spans) for j in range(s, e)]


def close(a, b, **tol):
    a, b = (torch.as_tensor(v, dtype=torch.float64) for v in (a, b))
    torch.testing.assert_close(a, b, **(tol or TOL))


# ---------------------------------------------------------------- layering


def test_algorithms_import_only_torch_and_stdlib():
    # pure stdlib (random, statistics: the seeded bootstrap and normal quantiles of intervals.py) is fine;
    # what must never come in is a process group, a config object or an I/O library
    allowed = {"torch", "math", "typing", "dataclasses", "__future__", "megarlhf", "random", "statistics"}
    pkg = pathlib.Path(alg.__file__).parent
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.startswith("megarlhf"):
                    assert name.startswith("megarlhf.algorithms"), f"{path.name} imports {name}"


# ---------------------------------------------------------------- kl


def naive_kl(lp, ref, estimator):
    r = lp - ref
    return {"k1": r, "k2": 0.5 * r * r, "k3": math.exp(-r) - 1 + r}[estimator]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_matches_formulas(estimator):
    _, _, field = make_batch(0)
    lp, ref = field(), field()
    out = alg.kl_penalty(lp, ref, estimator)
    expected = [
        [naive_kl(a, b, estimator) for a, b in zip(row_lp, row_ref)]
        for row_lp, row_ref in zip(lp.tolist(), ref.tolist())
    ]
    close(out, expected)
    if estimator != "k1":
        assert (out >= 0).all()


def test_kl_estimators_table_and_unknown_raises():
    assert alg.KL_ESTIMATORS == ("k1", "k2", "k3")
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        alg.kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "k4")


# ---------------------------------------------------------------- masked statistics


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_statistics_match_naive(seed):
    mask, spans, field = make_batch(seed, garbage=float("nan"))
    x = field(scale=2.0, shift=0.5)
    xs = masked_elements(x.tolist(), spans)
    n = len(xs)
    mean = sum(xs) / n
    var_biased = sum((v - mean) ** 2 for v in xs) / n
    var_unbiased = sum((v - mean) ** 2 for v in xs) / (n - 1)
    close(alg.masked_sum(x, mask), sum(xs))
    close(alg.masked_mean(x, mask), mean)
    close(alg.masked_var(x, mask), var_unbiased)
    close(alg.masked_var(x, mask, unbiased=False), var_biased)

    for shift_mean in (True, False):
        w = alg.masked_whiten(x, mask, shift_mean=shift_mean, eps=1e-8)
        expected = [[0.0] * x.size(1) for _ in range(x.size(0))]
        for i, (s, e) in enumerate(spans):
            for j in range(s, e):
                v = (x[i, j].item() - mean) / math.sqrt(var_unbiased + 1e-8)
                expected[i][j] = v if shift_mean else v + mean
        close(w, expected)


def test_last_token_index():
    mask, spans, _ = make_batch(3)
    assert alg.last_token_index(mask).tolist() == [e - 1 for _, e in spans]
    assert alg.last_token_index(mask).dtype == torch.long
    mask[2] = 0
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        alg.last_token_index(mask)


# ---------------------------------------------------------------- rewards, gae


@pytest.mark.parametrize("seed", [0, 4])
def test_shape_rewards_matches_naive(seed):
    mask, spans, field = make_batch(seed, garbage=float("inf"))
    kl = field()
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(mask.size(0), generator=g, dtype=torch.float64)
    kl_coef = 0.05
    out = alg.shape_rewards(scores, kl, mask, kl_coef)
    expected = [[0.0] * mask.size(1) for _ in range(mask.size(0))]
    for i, (s, e) in enumerate(spans):
        for j in range(s, e):
            expected[i][j] = -kl_coef * kl[i, j].item()
        expected[i][e - 1] += scores[i].item()
    close(out, expected)


def test_shape_rewards_empty_row_raises():
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="empty"):
        alg.shape_rewards(torch.ones(2), torch.zeros(2, 3), mask, 0.1)


def naive_gae(rewards, values, spans, t, gamma, lam):
    adv = [[0.0] * t for _ in spans]
    ret = [[0.0] * t for _ in spans]
    for i, (s, e) in enumerate(spans):
        r, v = rewards[i][s:e], values[i][s:e]
        n = e - s
        for k in range(n):
            # A_k = sum_l (gamma lam)^l delta_{k+l}, the closed form rather than the recursion.
            total = 0.0
            for l in range(n - k):
                nxt = v[k + l + 1] if k + l + 1 < n else 0.0
                delta = r[k + l] + gamma * nxt - v[k + l]
                total += (gamma * lam) ** l * delta
            adv[i][s + k] = total
            ret[i][s + k] = total + v[k]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0), (1.0, 1.0)])
def test_gae_matches_naive(gamma, lam):
    mask, spans, field = make_batch(7, b=6, t=10, garbage=float("nan"))
    rewards, values = field(), field()
    adv, ret = alg.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = naive_gae(rewards.tolist(), values.tolist(), spans, mask.size(1), gamma, lam)
    close(adv, ref_adv)
    close(ret, ref_ret)


def test_gae_lam1_gamma1_returns_are_reward_to_go():
    # With gamma = lam = 1, the return is the plain sum of future rewards (values cancel).
    mask = torch.tensor([[0, 1, 1, 1, 0]], dtype=torch.float64)
    rewards = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0]], dtype=torch.float64)
    values = torch.tensor([[9.0, 0.5, -1.0, 4.0, 9.0]], dtype=torch.float64)
    _, ret = alg.gae(rewards, values, mask, 1.0, 1.0)
    close(ret, [[0.0, 6.0, 5.0, 3.0, 0.0]])


# ---------------------------------------------------------------- losses


def loss_inputs(seed, garbage=0.0):
    mask, spans, field = make_batch(seed, b=6, t=10, garbage=garbage)
    logprobs = field(scale=0.5, shift=-2.0)
    # Spread the ratio so that both sides of the clip range occur.
    old_logprobs = logprobs + field(scale=0.3)
    return mask, spans, field, logprobs, old_logprobs


def naive_policy(lp, old, adv, spans, c, n):
    loss = clipfrac = approxkl = ratio_sum = 0.0
    for i, (s, e) in enumerate(spans):
        for j in range(s, e):
            ratio = math.exp(lp[i][j] - old[i][j])
            a = -adv[i][j] * ratio
            b = -adv[i][j] * min(max(ratio, 1 - c), 1 + c)
            loss += max(a, b)
            clipfrac += 1.0 if b > a else 0.0
            approxkl += 0.5 * (lp[i][j] - old[i][j]) ** 2
            ratio_sum += ratio
    return loss / n, clipfrac / n, approxkl / n, ratio_sum / n


def test_policy_loss_and_stats_match_naive():
    mask, spans, field, lp, old = loss_inputs(0)
    adv = field()
    n = int(mask.sum()) + 7  # a global count larger than this batch's
    loss, stats = alg.policy_loss(lp, old, adv, mask, 0.2, n)
    ref = naive_policy(lp.tolist(), old.tolist(), adv.tolist(), spans, 0.2, n)
    close(loss, ref[0])
    close(stats["policy/pg_loss"], ref[0])
    close(stats["policy/clipfrac"], ref[1])
    close(stats["policy/approxkl"], ref[2])
    close(stats["policy/ratio"], ref[3])
    assert 0 < ref[1] * n < mask.sum()  # clipping is actually exercised
    for v in stats.values():
        assert v.dim() == 0 and not v.requires_grad


def test_policy_loss_ignores_padding():
    mask, _, field, lp, old = loss_inputs(1)
    adv = field()
    pad = ~mask.bool()
    lp_bad, old_bad = lp.masked_fill(pad, 300.0), old.masked_fill(pad, -300.0)
    lp_bad.requires_grad_()
    loss, stats = alg.policy_loss(lp_bad, old_bad, adv, mask, 0.2, 11)
    loss.backward()
    ref_loss, ref_stats = alg.policy_loss(lp, old, adv, mask, 0.2, 11)
    close(loss, ref_loss)
    for k in stats:
        close(stats[k], ref_stats[k])
    assert torch.isfinite(lp_bad.grad).all() and (lp_bad.grad[pad] == 0).all()


def test_policy_loss_gradient_analytic_and_finite_difference():
    mask, spans, field, lp, old = loss_inputs(2)
    adv = field()
    c, n = 0.2, 40
    lp = lp.clone().requires_grad_()
    loss, _ = alg.policy_loss(lp, old, adv, mask, c, n)
    (grad,) = torch.autograd.grad(loss, lp)

    # d/d lp of max(-A r, -A clip(r)) is -A r where the unclipped term wins, else 0
    # (the clipped term only wins outside [1-c, 1+c], where clip(r) is constant).
    expected = [[0.0] * mask.size(1) for _ in spans]
    for i, (s, e) in enumerate(spans):
        for j in range(s, e):
            r = math.exp(lp[i, j].item() - old[i, j].item())
            a = adv[i, j].item()
            unclipped_wins = -a * r >= -a * min(max(r, 1 - c), 1 + c)
            expected[i][j] = -a * r / n if unclipped_wins else 0.0
    close(grad, expected)

    lp_flat = lp.detach()
    h = 1e-6
    for i, (s, e) in enumerate(spans[:3]):
        j = e - 1
        plus, minus = lp_flat.clone(), lp_flat.clone()
        plus[i, j] += h
        minus[i, j] -= h
        f_plus = naive_policy(plus.tolist(), old.tolist(), adv.tolist(), spans, c, n)[0]
        f_minus = naive_policy(minus.tolist(), old.tolist(), adv.tolist(), spans, c, n)[0]
        fd = (f_plus - f_minus) / (2 * h)
        close(grad[i, j], fd, atol=1e-7, rtol=1e-6)


def test_value_loss_and_stats_match_naive():
    mask, spans, field = make_batch(5, b=6, t=10, garbage=float("nan"))
    values, returns = field(), field()
    old_values = values + field(scale=0.4)
    c, n = 0.2, int(mask.sum()) + 3
    loss, stats = alg.value_loss(values, old_values, returns, mask, c, n)
    v, o, r = values.tolist(), old_values.tolist(), returns.tolist()
    ref_loss = ref_clip = ref_mean = 0.0
    for i, (s, e) in enumerate(spans):
        for j in range(s, e):
            vc = o[i][j] + min(max(v[i][j] - o[i][j], -c), c)
            l1, l2 = (v[i][j] - r[i][j]) ** 2, (vc - r[i][j]) ** 2
            ref_loss += 0.5 * max(l1, l2)
            ref_clip += 1.0 if l2 > l1 else 0.0
            ref_mean += v[i][j]
    close(loss, ref_loss / n)
    close(stats["val/vf_loss"], ref_loss / n)
    close(stats["val/clipfrac"], ref_clip / n)
    close(stats["val/mean"], ref_mean / n)
    assert 0 < ref_clip < mask.sum()


def test_entropy_and_sft_loss_match_naive():
    mask, spans, field = make_batch(6, garbage=float("nan"))
    entropy, logprobs = field().abs(), field(shift=-1.0)
    n = 50
    ent_sum = sum(masked_elements(entropy.tolist(), spans))
    lp_sum = sum(masked_elements(logprobs.tolist(), spans))
    loss, stats = alg.entropy_loss(entropy, mask, n)
    close(loss, -ent_sum / n)
    close(stats["objective/entropy"], ent_sum / n)
    loss, stats = alg.sft_loss(logprobs, mask, n)
    close(loss, -lp_sum / n)
    close(stats["ptx/loss"], -lp_sum / n)


def test_losses_summed_over_a_split_equal_the_whole_batch():
    mask, _, field, lp, old = loss_inputs(8)
    adv, values, returns, entropy = field(), field(), field(), field().abs()
    old_values = values + field(scale=0.4)
    n = mask.sum()  # the global count, as a tensor (after an all-reduce)

    def all_losses(rows, lp_):
        def sel(x):
            return x[rows]

        out = {}
        for name, (loss, stats) in {
            "pg": alg.policy_loss(sel(lp_), sel(old), sel(adv), sel(mask), 0.2, n),
            "vf": alg.value_loss(sel(values), sel(old_values), sel(returns), sel(mask), 0.2, n),
            "ent": alg.entropy_loss(sel(entropy), sel(mask), n),
            "sft": alg.sft_loss(sel(lp_), sel(mask), n),
        }.items():
            out[name] = loss
            out.update(stats)
        return out

    lp_whole = lp.clone().requires_grad_()
    whole = all_losses(slice(None), lp_whole)
    (whole["pg"] + whole["sft"]).backward()

    lp_split = lp.clone().requires_grad_()
    pieces = [all_losses(rows, lp_split) for rows in (slice(0, 1), slice(1, 4), slice(4, 6))]
    summed = {k: sum(p[k] for p in pieces) for k in whole}
    (summed["pg"] + summed["sft"]).backward()

    for k in whole:
        close(summed[k], whole[k])
    close(lp_split.grad, lp_whole.grad)
    # and the whole-batch statistics are the plain token means
    close(whole["policy/ratio"], (lp - old).exp()[mask.bool()].mean())


def test_num_tokens_must_be_positive():
    x, m = torch.zeros(1, 3), torch.ones(1, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        alg.policy_loss(x, x, x, m, 0.2, 0)
    with pytest.raises(ValueError, match="num_tokens"):
        alg.sft_loss(x, m, -1)


# ---------------------------------------------------------------- policy_loss options, kl_loss


def naive_pg_terms(lp, old, adv, spans, low, high):
    """Per-row lists of the clipped surrogate loss_t over each row's span."""
    rows = []
    for i, (s, e) in enumerate(spans):
        row = []
        for j in range(s, e):
            ratio = math.exp(lp[i][j] - old[i][j])
            row.append(max(-adv[i][j] * ratio, -adv[i][j] * min(max(ratio, 1 - low), 1 + high)))
        rows.append(row)
    return rows


def naive_aggregate(rows, aggregation, n_tokens, n_sequences):
    if aggregation == "token":
        return sum(sum(r) for r in rows) / n_tokens
    return sum(sum(r) / len(r) for r in rows if r) / n_sequences


def test_policy_loss_defaults_reproduce_symmetric_token_loss():
    mask, _, field, lp, old = loss_inputs(10)
    adv = field()
    base, base_stats = alg.policy_loss(lp, old, adv, mask, 0.2, 31)
    same, same_stats = alg.policy_loss(
        lp, old, adv, mask, 0.2, 31, cliprange_low=0.2, cliprange_high=0.2, aggregation="token"
    )
    assert torch.equal(base, same)
    for k in base_stats:
        assert torch.equal(base_stats[k], same_stats[k])


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("low,high", [(0.2, 0.28), (0.1, 0.3), (0.2, 0.2)])
def test_policy_loss_clip_higher_and_aggregation_match_naive(aggregation, low, high):
    mask, spans, field, lp, old = loss_inputs(11, garbage=float("nan"))
    spans[3] = (spans[3][0], spans[3][0])  # an all-masked row: contributes 0
    mask[3] = 0.0
    adv = field()
    n_tokens, n_sequences = int(mask.sum()) + 4, mask.size(0) + 2
    loss, stats = alg.policy_loss(
        lp, old, adv, mask, 0.5, n_tokens,  # cliprange itself is overridden by low/high
        cliprange_low=low, cliprange_high=high, aggregation=aggregation, num_sequences=n_sequences,
    )
    rows = naive_pg_terms(lp.tolist(), old.tolist(), adv.tolist(), spans, low, high)
    expected = naive_aggregate(rows, aggregation, n_tokens, n_sequences)
    close(loss, expected)
    close(stats["policy/pg_loss"], expected)
    # clipfrac stays a token mean, with the asymmetric range
    clipped = 0
    for i, (s, e) in enumerate(spans):
        for j in range(s, e):
            r = math.exp(lp[i, j].item() - old[i, j].item())
            a = adv[i, j].item()
            clipped += -a * min(max(r, 1 - low), 1 + high) > -a * r
    close(stats["policy/clipfrac"], clipped / n_tokens)
    assert torch.isfinite(loss)


def test_clip_higher_clips_each_side_separately():
    # One token per row: ratio 1.25 with A > 0 (upper clip at 1 + high) and ratio 0.75
    # with A < 0 (lower clip at 1 - low).
    mask = torch.ones(2, 1, dtype=torch.float64)
    lp = torch.log(torch.tensor([[1.25], [0.75]], dtype=torch.float64))
    old = torch.zeros(2, 1, dtype=torch.float64)
    adv = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    loss, stats = alg.policy_loss(lp, old, adv, mask, 0.2, 2, cliprange_high=0.28)
    # row 0: max(-1.25, -1.25) = -1.25 (1.25 < 1.28, unclipped); row 1: max(0.75, 0.8) = 0.8
    close(loss, (-1.25 + 0.8) / 2)
    close(stats["policy/clipfrac"], 0.5)
    loss, _ = alg.policy_loss(lp, old, adv, mask, 0.2, 2, cliprange_low=0.3)
    # row 0: max(-1.25, -1.2) = -1.2 ; row 1: max(0.75, 0.7) = 0.75
    close(loss, (-1.2 + 0.75) / 2)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_policy_and_kl_loss_split_equals_whole(aggregation):
    mask, _, field, lp, old = loss_inputs(12)
    adv, ref = field(), lp + field(scale=0.2)
    n_tokens, n_sequences = mask.sum(), mask.size(0)
    kw = dict(aggregation=aggregation, num_sequences=n_sequences)

    def run(rows, lp_):
        pg, pg_stats = alg.policy_loss(
            lp_[rows], old[rows], adv[rows], mask[rows], 0.2, n_tokens, cliprange_high=0.28, **kw
        )
        kl, kl_stats = alg.kl_loss(lp_[rows], ref[rows], mask[rows], n_tokens, "k3", **kw)
        return {"pg": pg, "kl": kl, **pg_stats, **kl_stats}

    lp_whole = lp.clone().requires_grad_()
    whole = run(slice(None), lp_whole)
    (whole["pg"] + 0.1 * whole["kl"]).backward()
    lp_split = lp.clone().requires_grad_()
    pieces = [run(rows, lp_split) for rows in (slice(0, 2), slice(2, 3), slice(3, 6))]
    summed = {k: sum(p[k] for p in pieces) for k in whole}
    (summed["pg"] + 0.1 * summed["kl"]).backward()
    for k in whole:
        close(summed[k], whole[k])
    close(lp_split.grad, lp_whole.grad)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_kl_loss_matches_naive(estimator, aggregation):
    mask, spans, field = make_batch(13, b=6, t=10)
    lp = field(scale=0.5, shift=-2.0)
    ref = lp + field(scale=0.4)
    n_tokens, n_sequences = int(mask.sum()) + 5, 9
    loss, stats = alg.kl_loss(
        lp, ref, mask, n_tokens, estimator, aggregation=aggregation, num_sequences=n_sequences
    )
    rows = [
        [naive_kl(lp[i, j].item(), ref[i, j].item(), estimator) for j in range(s, e)]
        for i, (s, e) in enumerate(spans)
    ]
    expected = naive_aggregate(rows, aggregation, n_tokens, n_sequences)
    close(loss, expected)
    close(stats["policy/kl"], expected)
    assert set(stats) == {"policy/kl"} and not stats["policy/kl"].requires_grad


def test_kl_loss_default_k3_gradient_and_padding():
    mask, spans, field = make_batch(14, b=5, t=8)
    lp = field(scale=0.5, shift=-2.0)
    ref = lp + field(scale=0.4)
    pad = ~mask.bool()
    # Padding so extreme that k3's exp(-r) overflows there: must not reach loss or grad.
    lp_bad = lp.masked_fill(pad, -400.0).requires_grad_()
    ref_bad = ref.masked_fill(pad, 400.0)
    n = 20
    loss, _ = alg.kl_loss(lp_bad, ref_bad, mask, n)  # default estimator: k3
    (grad,) = torch.autograd.grad(loss, lp_bad)
    # d/d lp of exp(-r) - 1 + r, r = lp - ref, is 1 - exp(-r)
    expected = [[0.0] * mask.size(1) for _ in spans]
    ref_loss = 0.0
    for i, (s, e) in enumerate(spans):
        for j in range(s, e):
            r = lp[i, j].item() - ref[i, j].item()
            expected[i][j] = (1 - math.exp(-r)) / n
            ref_loss += math.exp(-r) - 1 + r
    close(grad, expected)
    close(loss, ref_loss / n)


def test_loss_aggregation_arguments_are_checked():
    x, m = torch.zeros(1, 3), torch.ones(1, 3)
    assert alg.LOSS_AGGREGATIONS == ("token", "sequence")
    with pytest.raises(ValueError, match="token.*sequence"):
        alg.policy_loss(x, x, x, m, 0.2, 3, aggregation="seq-mean")
    with pytest.raises(ValueError, match="num_sequences"):
        alg.policy_loss(x, x, x, m, 0.2, 3, aggregation="sequence")
    with pytest.raises(ValueError, match="num_sequences"):
        alg.kl_loss(x, x, m, 3, aggregation="sequence", num_sequences=0)
    with pytest.raises(ValueError, match="num_tokens"):
        alg.kl_loss(x, x, m, 0)
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        alg.kl_loss(x, x, m, 3, "k5")
    with pytest.raises(TypeError):
        alg.policy_loss(x, x, x, m, 0.2, 3, 0.1)  # the new options are keyword-only


# ---------------------------------------------------------------- controllers


def test_adaptive_kl_controller_hand_iterated():
    ctl = alg.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 256)  # error 0.5 -> clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000), rel=1e-12)
    ctl.update(3.0, 512)  # error -0.5 -> clipped to -0.2
    v2 = 0.2 * (1 + 0.2 * 256 / 10000) * (1 - 0.2 * 512 / 10000)
    assert ctl.value == pytest.approx(v2, rel=1e-12)
    ctl.update(6.6, 100)  # error 0.1, inside the clip
    v3 = v2 * (1 + 0.1 * 100 / 10000)
    assert ctl.value == pytest.approx(v3, rel=1e-12)
    ctl.update(6.0, 1000)  # on target: unchanged
    assert ctl.value == pytest.approx(v3, rel=1e-12)

    other = alg.AdaptiveKLController(1.0, target=6.0, horizon=10000)
    other.load_state_dict(ctl.state_dict())
    other.update(12.0, 50)
    ctl.update(12.0, 50)
    assert other.value == ctl.value == pytest.approx(v3 * (1 + 0.2 * 50 / 10000), rel=1e-12)


def test_fixed_kl_controller_and_factory():
    ctl = alg.make_kl_controller(0.1)
    assert isinstance(ctl, alg.FixedKLController)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.1
    other = alg.FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.1
    adaptive = alg.make_kl_controller(0.1, adaptive=True, target=6, horizon=10)
    assert isinstance(adaptive, alg.AdaptiveKLController)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kl_coef=-0.1),
        dict(kl_coef=0.1, adaptive=True, target=0.0, horizon=10),
        dict(kl_coef=0.1, adaptive=True, target=6.0, horizon=0),
        dict(kl_coef=0.1, adaptive=True, target=6.0, horizon=-5),
        dict(kl_coef=-0.1, adaptive=True, target=6.0, horizon=10),
        dict(kl_coef=0.1, adaptive=True),
    ],
)
def test_make_kl_controller_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        alg.make_kl_controller(**kwargs)


# ---------------------------------------------------------------- score processing


def test_running_moments_match_concatenation():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=g) * 3 + 1 for n in (8, 3, 1, 16, 2)]
    rm = alg.RunningMoments()
    assert rm.count == 0 and float(rm.std) == 1.0
    seen = []
    for x in batches:
        mean_b, std_b = rm.update(x)
        seen.append(x.double())
        allx = torch.cat(seen)
        close(mean_b, x.double().mean())
        close(std_b, x.double().std() if x.numel() > 1 else 0.0)
        close(rm.mean, allx.mean())
        close(rm.std, allx.std())
        assert rm.count == allx.numel()

    clone = alg.RunningMoments()
    clone.load_state_dict(rm.state_dict())
    extra = torch.randn(5, generator=g)
    clone.update(extra)
    allx = torch.cat(seen + [extra.double()])
    close(clone.mean, allx.mean())
    close(clone.std, allx.std())


def test_running_moments_single_score_and_bad_input():
    rm = alg.RunningMoments()
    _, std_b = rm.update(torch.tensor([2.5]))
    assert float(rm.mean) == 2.5 and float(rm.std) == 0.0 and float(std_b) == 0.0
    for bad in (torch.zeros(0), torch.zeros(2, 2)):
        with pytest.raises(ValueError, match="1-D"):
            rm.update(bad)


def test_normalize_and_clip_scores():
    scores = torch.tensor([-5.0, -0.5, 0.0, 2.0, 7.0], dtype=torch.float64)
    ref = [(s - 1.0) / 2.0 for s in scores.tolist()]
    close(alg.normalize_scores(scores, 1.0, 2.0, eps=0.0), ref)
    ref = [(s - 1.0) / (2.0 + 1e-8) for s in scores.tolist()]
    close(alg.normalize_scores(scores, 1.0, 2.0), ref)
    close(alg.clip_scores(scores, 1.5), [min(max(s, -1.5), 1.5) for s in scores.tolist()])
    assert alg.clip_scores(scores, None) is scores
    with pytest.raises(ValueError, match="clip"):
        alg.clip_scores(scores, 0.0)
