"""GSPO, GSPO-token, CISPO, SAPO, DAPO's overlong penalty and the rollout correction
against naive Python loops on fixed tensors (an all-masked row and a one-token row among
them), plus the gradient identities the papers rely on."""

from __future__ import annotations

import math

import pytest
import torch

from megarlhf import algorithms as alg
from tests.unit.test_algorithms import close

# Rows: spans [start, end) of response tokens in a [6, 8] batch; row 2 is all-masked,
# row 3 has a single token.
SPANS = [(1, 6), (0, 8), (3, 3), (5, 6), (2, 7), (4, 8)]
B, T = len(SPANS), 8


def inputs(seed: int, per_sequence_advantage: bool = False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.float64)
    for i, (s, e) in enumerate(SPANS):
        mask[i, s:e] = 1.0
    lp = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 2.0
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios on both sides of the clip
    if per_sequence_advantage:
        adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T) * mask
    else:
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    # Garbage outside the mask must not leak into anything.
    pad = ~mask.bool()
    return mask, lp.masked_fill(pad, 50.0), old.masked_fill(pad, -50.0), adv.masked_fill(pad, 1e6)


def naive_aggregate(rows: list[list[float]], aggregation: str, n_tokens, n_sequences) -> float:
    if aggregation == "token":
        return sum(sum(r) for r in rows) / n_tokens
    return sum(sum(r) / len(r) for r in rows if r) / n_sequences


def naive_token_terms(objective: str, lp, old, adv, knobs) -> list[list[float]]:
    """Per-row lists of loss_t for the token objectives (ppo, cispo, sapo)."""
    rows = []
    for i, (s, e) in enumerate(SPANS):
        row = []
        for t in range(s, e):
            r, a = math.exp(lp[i][t] - old[i][t]), adv[i][t]
            if objective == "ppo":
                lo, hi = knobs["cliprange_low"], knobs["cliprange_high"]
                row.append(max(-a * r, -a * min(max(r, 1 - lo), 1 + hi)))
            elif objective == "cispo":
                lo, hi = knobs["cliprange_low"], knobs["cliprange_high"]
                row.append(-min(max(r, 1 - lo), 1 + hi) * a * lp[i][t])
            else:  # sapo
                tau = knobs["temperature_pos"] if a > 0 else knobs["temperature_neg"]
                row.append(-a * (4 / tau) / (1 + math.exp(-tau * (r - 1))))
        rows.append(row)
    return rows


def naive_gspo_terms(lp, old, adv, knobs) -> list[list[float]]:
    """Per-row lists of GSPO's one term per sequence, repeated on each of its tokens."""
    lo, hi = knobs["cliprange_low"], knobs["cliprange_high"]
    rows = []
    for i, (s, e) in enumerate(SPANS):
        if e == s:
            rows.append([])
            continue
        si = math.exp(sum(lp[i][t] - old[i][t] for t in range(s, e)) / (e - s))
        a = sum(adv[i][t] for t in range(s, e)) / (e - s)
        rows.append([max(-a * si, -a * min(max(si, 1 - lo), 1 + hi))] * (e - s))
    return rows


CLIP = {"cliprange_low": 0.2, "cliprange_high": 0.28}
SAPO = {"temperature_pos": 1.0, "temperature_neg": 1.05}
CASES = {"ppo": CLIP, "gspo": CLIP, "gspo_token": CLIP, "cispo": CLIP, "sapo": SAPO}


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("objective", sorted(CASES))
def test_objective_matches_naive_loop(objective, aggregation):
    per_seq = objective == "gspo_token"  # its value equals GSPO's only with one advantage per row
    mask, lp, old, adv = inputs(0, per_sequence_advantage=per_seq)
    n_tok, n_seq = float(mask.sum()) + 3, 5.0 + 2  # global counts larger than this batch's
    knobs = CASES[objective]
    loss, stats = alg.POLICY_OBJECTIVES[objective](
        lp, old, adv, mask, n_tok, aggregation=aggregation, num_sequences=n_seq, **knobs
    )
    L, O, A = lp.tolist(), old.tolist(), adv.tolist()
    if objective in ("gspo", "gspo_token"):
        rows = naive_gspo_terms(L, O, A, knobs)
    else:
        rows = naive_token_terms(objective, L, O, A, knobs)
    close(loss, naive_aggregate(rows, aggregation, n_tok, n_seq))
    close(stats["policy/pg_loss"], loss)
    ratios = [math.exp(L[i][t] - O[i][t]) for i, (s, e) in enumerate(SPANS) for t in range(s, e)]
    close(stats["policy/approxkl"], sum(0.5 * math.log(r) ** 2 for r in ratios) / n_tok)
    assert set(stats) == {"policy/pg_loss", "policy/clipfrac", "policy/approxkl", "policy/ratio"}
    assert 0 <= float(stats["policy/clipfrac"]) * n_tok <= mask.sum()
    assert torch.isfinite(loss)
    lp_grad = lp.clone().requires_grad_()
    grad_loss, _ = alg.POLICY_OBJECTIVES[objective](
        lp_grad, old, adv, mask, n_tok, aggregation=aggregation, num_sequences=n_seq, **knobs
    )
    (grad,) = torch.autograd.grad(grad_loss, lp_grad)
    assert torch.isfinite(grad).all() and (grad[~mask.bool()] == 0).all()


@pytest.mark.parametrize("objective", sorted(CASES))
def test_objective_gradient_matches_finite_difference(objective):
    """d loss / d logprobs against central differences of the naive loop (CISPO's and
    GSPO-token's stop-gradients make their gradients differ from their values' slopes:
    those two are checked analytically instead)."""
    mask, lp, old, adv = inputs(1)
    knobs, n_tok, n_seq = CASES[objective], 40.0, 5.0
    x = lp.clone().requires_grad_()
    loss, _ = alg.POLICY_OBJECTIVES[objective](x, old, adv, mask, n_tok, aggregation="sequence", num_sequences=n_seq, **knobs)
    (grad,) = torch.autograd.grad(loss, x)
    O, A = old.tolist(), adv.tolist()
    for i, (s, e) in enumerate(SPANS):
        for t in range(s, e):
            if objective == "cispo":
                lo, hi = knobs["cliprange_low"], knobs["cliprange_high"]
                r = math.exp(lp[i, t].item() - O[i][t])
                expected = -min(max(r, 1 - lo), 1 + hi) * A[i][t] / (e - s) / n_seq
            elif objective == "gspo_token":
                lo, hi = knobs["cliprange_low"], knobs["cliprange_high"]
                si = math.exp(sum(lp[i, u].item() - O[i][u] for u in range(s, e)) / (e - s))
                a = A[i][t]
                unclipped_wins = -a * si >= -a * min(max(si, 1 - lo), 1 + hi)
                expected = -a * si / (e - s) / n_seq if unclipped_wins else 0.0
            else:
                h = 1e-6
                plus, minus = lp.tolist(), lp.tolist()
                plus[i][t] += h
                minus[i][t] -= h
                terms = naive_gspo_terms if objective == "gspo" else (lambda *a: naive_token_terms(objective, *a))
                f = [naive_aggregate(terms(p, O, A, knobs), "sequence", n_tok, n_seq) for p in (plus, minus)]
                expected = (f[0] - f[1]) / (2 * h)
            close(grad[i, t], expected, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_gspo_token_gradient_equals_gspo_with_one_advantage_per_sequence(aggregation):
    mask, lp, old, adv = inputs(2, per_sequence_advantage=True)
    grads, losses = [], []
    for objective in ("gspo", "gspo_token"):
        x = lp.clone().requires_grad_()
        loss, _ = alg.POLICY_OBJECTIVES[objective](x, old, adv, mask, 30.0, aggregation=aggregation, num_sequences=5.0, **CLIP)
        grads.append(torch.autograd.grad(loss, x)[0])
        losses.append(loss)
    close(losses[0], losses[1])
    close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0.1  # a real gradient, clipped rows and unclipped ones


def test_sapo_gradient_at_ratio_one_is_the_policy_gradient():
    """At r = 1 SAPO's gate passes exactly the REINFORCE gradient -A d logprobs."""
    mask, lp, _, adv = inputs(3)
    x = lp.clone().requires_grad_()
    loss, stats = alg.sapo_loss(x, lp, adv, mask, 10.0, aggregation="token", **SAPO)
    (grad,) = torch.autograd.grad(loss, x)
    close(grad, torch.where(mask.bool(), -adv / 10.0, 0))
    assert float(stats["policy/clipfrac"]) == 0.0


def test_weights_multiply_each_token_term():
    """The rollout correction's weights scale loss_t before the aggregation, for every
    objective; all-ones weights change nothing; weights carry no gradient."""
    mask, lp, old, adv = inputs(4, per_sequence_advantage=True)
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    for name, knobs in CASES.items():
        fn = alg.POLICY_OBJECTIVES[name]
        plain, _ = fn(lp, old, adv, mask, 30.0, **knobs)
        ones, _ = fn(lp, old, adv, mask, 30.0, weights=torch.ones(B, T, dtype=torch.float64), **knobs)
        close(plain, ones)
        weighted, _ = fn(lp, old, adv, mask, 30.0, aggregation="token", weights=w, **knobs)
        per_token, _ = fn(lp, old, adv, mask, 1.0, aggregation="token", weights=torch.zeros_like(w), **knobs)
        assert float(per_token) == 0.0
        assert not weighted.requires_grad


def test_objective_arguments_are_checked():
    mask, lp, old, adv = inputs(5)
    with pytest.raises(ValueError, match="num_sequences"):
        alg.gspo_loss(lp, old, adv, mask, 10.0, aggregation="sequence", **CLIP)
    with pytest.raises(ValueError, match="num_tokens"):
        alg.cispo_loss(lp, old, adv, mask, 0, **CLIP)
    with pytest.raises(ValueError, match="temperatures"):
        alg.sapo_loss(lp, old, adv, mask, 10.0, temperature_pos=0.0, temperature_neg=1.0)


def test_overlong_penalty_matches_dapo():
    lengths = torch.tensor([0, 10, 12, 13, 16, 20, 25])
    got = alg.overlong_penalty(lengths, max_length=20, buffer_length=8, penalty_factor=0.5)
    expected = []
    for n in lengths.tolist():
        if n <= 12:
            expected.append(0.0)
        elif n <= 20:
            expected.append(0.5 * (12 - n) / 8)
        else:
            expected.append(-0.5)
    close(got, expected, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="buffer_length"):
        alg.overlong_penalty(lengths, 20, 0)


# ---------------------------------------------------------------- rollout correction


def test_mismatch_metrics_match_naive():
    mask, lp, old, _ = inputs(6)
    engine = old  # a large, planted gap
    m = alg.mismatch_metrics(lp, engine, mask)
    L, E = lp.tolist(), engine.tolist()
    toks = [(i, t) for i, (s, e) in enumerate(SPANS) for t in range(s, e)]
    rho = [math.exp(L[i][t] - E[i][t]) for i, t in toks]
    seq = [math.exp(sum(L[i][t] - E[i][t] for t in range(s, e))) for i, (s, e) in enumerate(SPANS) if e > s]
    p = "rollout_correction/"
    close(m[p + "token_ratio_mean"], sum(rho) / len(rho))
    close(m[p + "token_ratio_max"], max(rho))
    close(m[p + "token_ratio_outside"], sum(not 0.8 <= r <= 1.25 for r in rho) / len(rho))
    close(m[p + "seq_ratio_mean"], sum(seq) / len(seq))
    close(m[p + "seq_ratio_max"], max(seq))
    close(m[p + "seq_ratio_outside"], sum(not 0.8 <= r <= 1.25 for r in seq) / len(seq))
    close(m[p + "k3_kl"], sum(r - 1 - math.log(r) for r in rho) / len(rho))
    close(m[p + "token_mult_prob_error"], sum(math.exp(abs(math.log(r))) for r in rho) / len(rho))
    close(m[p + "logprob_abs_diff_max"], max(abs(math.log(r)) for r in rho))
    same = alg.mismatch_metrics(lp, lp, mask)
    assert float(same[p + "k3_kl"]) == 0 and float(same[p + "token_mult_prob_error"]) == 1
    assert float(same[p + "token_ratio_outside"]) == 0 and float(same[p + "seq_ratio_max"]) == 1


@pytest.mark.parametrize("mode", [m for m in alg.ROLLOUT_CORRECTIONS if m != "none"])
def test_rollout_is_weights_match_naive(mode):
    mask, lp, old, _ = inputs(7)
    cap, c_min, c_max = 1.3, 0.7, 1.4
    w, stats = alg.rollout_is_weights(lp, old, mask, mode, cap=cap, c_min=c_min, c_max=c_max)
    level, rule = mode.split("_")
    L, E = lp.tolist(), old.tolist()
    expected = [[0.0] * T for _ in range(B)]
    acted = 0
    for i, (s, e) in enumerate(SPANS):
        seq = math.exp(sum(L[i][t] - E[i][t] for t in range(s, e)))
        for t in range(s, e):
            rho = seq if level == "sequence" else math.exp(L[i][t] - E[i][t])
            if rule == "truncate":
                expected[i][t], hit = min(rho, cap), rho > cap
            else:
                hit = not c_min <= rho <= c_max
                expected[i][t] = 0.0 if hit else rho
            acted += hit
    close(w, expected, atol=1e-6, rtol=1e-6)  # computed in float32
    n = int(mask.sum())
    key = "rollout_correction/masked_fraction" if rule == "mask" else "rollout_correction/truncated_fraction"
    close(stats[key], acted / n, atol=1e-7, rtol=0)
    assert 0 < acted < n
    assert not w.requires_grad


def test_rollout_is_weights_none_and_bad_arguments():
    mask, lp, old, _ = inputs(8)
    w, stats = alg.rollout_is_weights(lp, old, mask, "none")
    assert torch.equal(w, mask.float()) and float(stats["rollout_correction/is_weight_mean"]) == 1
    with pytest.raises(ValueError, match="unknown"):
        alg.rollout_is_weights(lp, old, mask, "token_clip")
    with pytest.raises(ValueError, match="c_min < 1 < c_max"):
        alg.rollout_is_weights(lp, old, mask, "token_mask", c_min=1.1)


# ---------------------------------------------------------------- learning on a bandit


PAPER_KNOBS = {
    "ppo": ({"cliprange_low": 0.2, "cliprange_high": 0.28}, "token"),
    "gspo": ({"cliprange_low": 3e-4, "cliprange_high": 4e-4}, "sequence"),
    "gspo_token": ({"cliprange_low": 3e-4, "cliprange_high": 4e-4}, "sequence"),
    "cispo": ({"cliprange_low": 1.0, "cliprange_high": 4.0}, "token"),
    "sapo": (SAPO, "sequence"),
}


@pytest.mark.parametrize("objective", sorted(PAPER_KNOBS))
def test_objective_learns_a_token_bandit(objective):
    """Each objective, at its paper's knobs, trains a tiny policy (one softmax over 6
    tokens, responses of 1-4 tokens, reward = fraction of tokens equal to 0) with GRPO's
    loop: 30 iterations of 4 prompts x 8 samples, group advantages, 2 optimizer steps per
    batch (the second off-policy, so the clip / gate / IS weight acts). The probability of
    the rewarded token must rise from 1/6 and nothing may turn non-finite."""
    g = torch.Generator().manual_seed(0)
    knobs, aggregation = PAPER_KNOBS[objective]
    theta = torch.zeros(6, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    start = torch.softmax(theta, -1)[0].item()
    for _ in range(30):
        with torch.no_grad():
            probs = torch.softmax(theta, -1)
            tokens = torch.multinomial(probs, 32 * 4, replacement=True, generator=g).view(32, 4)
            lengths = torch.randint(1, 5, (32,), generator=g)
            mask = (torch.arange(4) < lengths.unsqueeze(1)).float()
            scores = ((tokens == 0).float() * mask).sum(1) / lengths
            adv = alg.broadcast_to_tokens(alg.grpo_advantages(scores, 8), mask)
            old = torch.log_softmax(theta, -1)[tokens]
        for _ in range(2):
            lp = torch.log_softmax(theta, -1)[tokens]
            loss, stats = alg.POLICY_OBJECTIVES[objective](
                lp, old, adv, mask, mask.sum(), aggregation=aggregation, num_sequences=32.0, **knobs
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    end = torch.softmax(theta, -1)[0].item()
    assert end > start + 0.5, (start, end)  # measured: 0.167 -> 0.91-0.97
