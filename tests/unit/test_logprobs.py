"""logprobs_and_entropy (one TP rank) against a naive per-token loop in float64."""

import math

import pytest
import torch

from megarlhf.models.logprobs import logprobs_and_entropy


def naive(logits, tokens, vocab_size, temperature):
    b, t, _ = logits.shape
    lp = torch.zeros(b, t, dtype=torch.float64)
    ent = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            row = logits[i, j, :vocab_size].double() / temperature
            z = math.log(sum(math.exp(v) for v in row.tolist()))
            logp = [v - z for v in row.tolist()]
            lp[i, j] = logp[tokens[i, j]]
            ent[i, j] = -sum(math.exp(v) * v for v in logp)
    return lp, ent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("vocab_size", [32, 27])  # 27: the last 5 rows are padding
def test_matches_naive_loop(vocab_size, temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 32, generator=g) * 3
    tokens = torch.randint(0, vocab_size, (2, 5), generator=g)
    lp, ent = logprobs_and_entropy(logits, tokens, vocab_size=vocab_size, temperature=temperature)
    ref_lp, ref_ent = naive(logits, tokens, vocab_size, temperature)
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)


def test_gradients_match_autograd_of_log_softmax():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 4, 40, generator=g) * 2).requires_grad_()
    tokens = torch.randint(0, 37, (3, 4), generator=g)
    w_lp, w_ent = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)

    lp, ent = logprobs_and_entropy(logits, tokens, vocab_size=37, temperature=0.9)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()

    ref_logits = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(ref_logits[..., :37] / 0.9, dim=-1)
    ref_lp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    ((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum()).backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=1e-6, rtol=1e-5)
    assert logits.grad[..., 37:].abs().max() == 0  # padded rows get no gradient


def test_does_not_modify_input_and_rejects_shape_mismatch():
    logits = torch.randn(1, 3, 8)
    before = logits.clone()
    logprobs_and_entropy(logits, torch.zeros(1, 3, dtype=torch.long))
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="disagree"):
        logprobs_and_entropy(logits, torch.zeros(1, 4, dtype=torch.long))


def test_bf16_logits_are_computed_in_float32():
    logits = torch.randn(1, 2, 16)
    tokens = torch.tensor([[1, 2]])
    lp32, _ = logprobs_and_entropy(logits.bfloat16().float(), tokens)
    lp16, _ = logprobs_and_entropy(logits.bfloat16(), tokens)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, lp32)
