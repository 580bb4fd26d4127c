"""megarlhf.algorithms.preference against naive per-pair Python references (float64).

The references recompute each loss from the papers' formulas with `math`, pair by pair;
they never call the function under test.
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


def log_sigmoid(x):
    # Stable for both signs, independent of torch.
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return math.exp(log_sigmoid(x))


def pairs(seed, n=6, scale=3.0):
    """Four [n] float64 tensors of summed log-probs (negative, like real ones)."""
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * scale * 10) for _ in range(4)]


def naive_pair_loss(pc, pr, rc, rr, beta, loss_type, eps):
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    raise AssertionError(loss_type)


def naive_dpo(inputs, beta, n_pairs, loss_type, eps=0.0):
    pc, pr, rc, rr = (x.tolist() for x in inputs)
    out = dict.fromkeys(
        [
            "dpo/loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ],
        0.0,
    )
    for i in range(len(pc)):
        chosen_reward = beta * (pc[i] - rc[i])
        rejected_reward = beta * (pr[i] - rr[i])
        out["dpo/loss"] += naive_pair_loss(pc[i], pr[i], rc[i], rr[i], beta, loss_type, eps)
        out["rewards/chosen"] += chosen_reward
        out["rewards/rejected"] += rejected_reward
        out["rewards/accuracies"] += 1.0 if chosen_reward > rejected_reward else 0.0
        out["rewards/margins"] += chosen_reward - rejected_reward
        out["logps/chosen"] += pc[i]
        out["logps/rejected"] += pr[i]
    return {k: v / n_pairs for k, v in out.items()}


# ---------------------------------------------------------------- sequence log-probs


def test_sequence_logps_sum_and_mean_match_naive():
    rng = random.Random(0)
    b, t = 5, 8
    spans = []
    for _ in range(b):
        s = rng.randint(0, t - 1)
        spans.append((s, rng.randint(s + 1, t)))
    spans[3] = (4, 4)  # an all-masked row
    mask = torch.zeros(b, t, dtype=torch.float64)
    for i, (s, e) in enumerate(spans):
        mask[i, s:e] = 1.0
    lp = -torch.rand(b, t, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lp = torch.where(mask.bool(), lp, float("nan"))  # padding is never read
    sums, means = [], []
    for i, (s, e) in enumerate(spans):
        total = sum(lp[i, j].item() for j in range(s, e))
        sums.append(total)
        means.append(total / (e - s) if e > s else 0.0)
    close(alg.sequence_logps(lp, mask), sums)
    close(alg.sequence_mean_logps(lp, mask), means)
    assert alg.sequence_logps(lp, mask)[3] == 0 and alg.sequence_mean_logps(lp, mask)[3] == 0


# ---------------------------------------------------------------- dpo_loss


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.1), ("sigmoid", 0.1, 0.5), ("ipo", 0.1, 0.0),
     ("ipo", 1.0, 0.0), ("hinge", 0.1, 0.0), ("hinge", 0.3, 0.0)],
)
def test_dpo_loss_and_stats_match_naive(loss_type, beta, eps):
    inputs = pairs(1, n=8)
    n_pairs = 8 + 5  # a global count larger than this batch's
    loss, stats = alg.dpo_loss(*inputs, beta, n_pairs, loss_type=loss_type, label_smoothing=eps)
    ref = naive_dpo(inputs, beta, n_pairs, loss_type, eps)
    close(loss, ref["dpo/loss"])
    assert set(stats) == set(ref)
    for k in ref:
        close(stats[k], ref[k])
    for v in stats.values():
        assert v.dim() == 0 and not v.requires_grad
    # accuracies are exercised on both sides
    assert 0 < ref["rewards/accuracies"] * n_pairs < 8


def test_dpo_default_is_sigmoid_without_smoothing():
    inputs = pairs(2)
    a, _ = alg.dpo_loss(*inputs, 0.1, 6)
    close(a, naive_dpo(inputs, 0.1, 6, "sigmoid")["dpo/loss"])


def test_ipo_on_averaged_logps_matches_trl_convention():
    # TRL's IPO: each sequence's summed log-prob divided by its response length, then
    # (h - 1/(2 beta))^2. The caller builds that with sequence_mean_logps.
    b, t = 4, 6
    lengths = [[3, 5], [1, 6], [4, 2], [6, 6]]  # (chosen, rejected) per pair
    g = torch.Generator().manual_seed(3)
    fields = [-torch.rand(b, t, generator=g, dtype=torch.float64) for _ in range(4)]
    masks = [torch.zeros(b, t, dtype=torch.float64) for _ in range(2)]
    for i, (lc, lr) in enumerate(lengths):
        masks[0][i, :lc] = 1.0
        masks[1][i, :lr] = 1.0
    avg = [alg.sequence_mean_logps(f, masks[k % 2]) for k, f in enumerate(fields)]
    # fields: policy chosen, policy rejected, ref chosen, ref rejected
    loss, _ = alg.dpo_loss(avg[0], avg[1], avg[2], avg[3], 0.5, b, loss_type="ipo")
    expected = 0.0
    for i, (lc, lr) in enumerate(lengths):
        m = [sum(fields[k][i, :n].tolist()) / n for k, n in zip(range(4), (lc, lr, lc, lr))]
        h = (m[0] - m[2]) - (m[1] - m[3])
        expected += (h - 1 / (2 * 0.5)) ** 2
    close(loss, expected / b)


def test_dpo_extreme_margins_are_finite():
    big = torch.tensor([2000.0, -2000.0], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    pc = big.clone().requires_grad_()
    loss, stats = alg.dpo_loss(pc, zero, zero, zero, 1.0, 2, label_smoothing=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad).all()
    # h = +2000: (1-eps)*~0 + eps*2000 ; h = -2000: (1-eps)*2000 + eps*~0
    close(loss, (0.1 * 2000 + 0.9 * 2000) / 2)
    close(stats["rewards/accuracies"], 0.5)


def test_dpo_gradient_matches_hand_derivation():
    # d/dh of each loss (per pair), chain: dh/d pc = 1, dh/d pr = -1, dh/d rc = -1, ...
    #   sigmoid: -(1-eps) beta sigmoid(-beta h) + eps beta sigmoid(beta h)
    #   ipo:     2 (h - 1/(2 beta))
    #   hinge:   -beta [beta h < 1]
    pc = torch.tensor([-5.0, -4.0, -7.5], dtype=torch.float64)
    pr = torch.tensor([-12.0, -3.0, -7.0], dtype=torch.float64)
    rc = torch.tensor([-11.0, -4.5, -6.0], dtype=torch.float64)
    rr = torch.tensor([-11.5, -3.2, -9.0], dtype=torch.float64)
    n_pairs = 5
    cases = [("sigmoid", 0.2, 0.0), ("sigmoid", 0.2, 0.25), ("ipo", 0.4, 0.0), ("hinge", 0.6, 0.0)]
    for loss_type, beta, eps in cases:
        leaves = [x.clone().requires_grad_() for x in (pc, pr, rc, rr)]
        loss, _ = alg.dpo_loss(*leaves, beta, n_pairs, loss_type=loss_type, label_smoothing=eps)
        grads = torch.autograd.grad(loss, leaves)
        dldh = []
        for i in range(3):
            h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
            if loss_type == "sigmoid":
                d = -(1 - eps) * beta * sigmoid(-beta * h) + eps * beta * sigmoid(beta * h)
            elif loss_type == "ipo":
                d = 2 * (h - 1 / (2 * beta))
            else:
                d = -beta if beta * h < 1 else 0.0
            dldh.append(d / n_pairs)
        for grad, sign in zip(grads, (1, -1, -1, 1)):
            close(grad, [sign * d for d in dldh])
        # both sides of the hinge are exercised
        if loss_type == "hinge":
            assert 0 < sum(1 for d in dldh if d != 0) < 3


def test_dpo_split_over_microbatches_equals_whole():
    inputs = pairs(4, n=7)
    n_pairs = 7

    lengths = torch.tensor([3, 9, 1, 4, 4, 7, 2])

    def run(rows, leaves):
        loss, stats = alg.dpo_loss(*(x[rows] for x in leaves), 0.1, n_pairs, label_smoothing=0.1)
        rpo, rpo_stats = alg.rpo_term(leaves[0][rows], lengths[rows], 0.5, n_pairs)
        return {"loss": loss, "rpo": rpo, **stats, **rpo_stats}

    whole_leaves = [x.clone().requires_grad_() for x in inputs]
    whole = run(slice(None), whole_leaves)
    (whole["loss"] + whole["rpo"]).backward()

    split_leaves = [x.clone().requires_grad_() for x in inputs]
    pieces = [run(rows, split_leaves) for rows in (slice(0, 2), slice(2, 3), slice(3, 7))]
    summed = {k: sum(p[k] for p in pieces) for k in whole}
    (summed["loss"] + summed["rpo"]).backward()
    for k in whole:
        close(summed[k], whole[k])
    for a, b in zip(split_leaves, whole_leaves):
        close(a.grad, b.grad)
    # with num_pairs = the batch size, the stats are plain means
    close(whole["rewards/chosen"], (0.1 * (inputs[0] - inputs[2])).mean())


# ---------------------------------------------------------------- rpo


def test_rpo_term_matches_naive_and_gradient():
    pc = torch.tensor([-12.0, -3.0, -8.0, 0.0], dtype=torch.float64)
    lengths = torch.tensor([6, 1, 4, 0])  # an empty chosen response contributes 0
    alpha, n_pairs = 0.7, 6
    expected_nll = 0.0
    for lp, n in zip(pc.tolist(), lengths.tolist()):
        expected_nll += -lp / max(n, 1)
    leaf = pc.clone().requires_grad_()
    loss, stats = alg.rpo_term(leaf, lengths, alpha, n_pairs)
    close(loss, alpha * expected_nll / n_pairs)
    close(stats["nll_loss"], expected_nll / n_pairs)
    (grad,) = torch.autograd.grad(loss, leaf)
    close(grad, [-alpha / (max(n, 1) * n_pairs) for n in lengths.tolist()])


# ---------------------------------------------------------------- validation


def test_dpo_rejects_bad_arguments():
    x = torch.zeros(2)
    assert alg.DPO_LOSS_TYPES == ("sigmoid", "ipo", "hinge")
    with pytest.raises(ValueError, match="sigmoid.*ipo.*hinge"):
        alg.dpo_loss(x, x, x, x, 0.1, 2, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        alg.dpo_loss(x, x, x, x, 0.1, 2, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        alg.dpo_loss(x, x, x, x, 0.1, 2, label_smoothing=0.6)
    with pytest.raises(ValueError, match="beta"):
        alg.dpo_loss(x, x, x, x, 0.0, 2)
    with pytest.raises(ValueError, match="num_pairs"):
        alg.dpo_loss(x, x, x, x, 0.1, 0)
    with pytest.raises(ValueError, match="num_pairs"):
        alg.rpo_term(x, torch.ones(2), 1.0, -1)
    with pytest.raises(ValueError, match="alpha"):
        alg.rpo_term(x, torch.ones(2), -1.0, 2)
