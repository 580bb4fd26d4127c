"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocab.

Layer: models/. Under TP each rank holds logits for a contiguous slice of the (padded)
vocabulary, [B, T, V/tp]. Like Megatron-Core's `vocab_parallel_cross_entropy` we reduce
three per-token scalars over the TP group instead of gathering [B, T, V]: the max, the
partition sum of exp, and the target logit. Unlike it, the TP group is an argument (each
role has its own), the input logits are not modified in place (the caller may reuse
them), the entropy comes out of the same pass, and padded vocabulary rows are masked.

Cost: one all-reduce(MAX) + one all-reduce(SUM) of [3, B*T] floats per call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Logit given to padded vocabulary rows: exp() underflows to exactly 0, and unlike -inf
# it never produces 0 * inf = nan in p * log p.
_MASKED_LOGIT = -1e30


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, vocab_size):
        # logits [N, Vl] (this rank's vocab slice, float32), target [N] global ids.
        tp = _group_size(tp_group)
        rank = 0 if tp_group is None else dist.get_rank(tp_group)
        local_v = logits.size(-1)
        start = rank * local_v
        if start + local_v > vocab_size:
            # Padded vocabulary rows never carry probability mass.
            col = torch.arange(start, start + local_v, device=logits.device)
            logits = logits.masked_fill(col >= vocab_size, _MASKED_LOGIT)

        logits_max = logits.max(dim=-1).values
        if tp > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
        shifted = logits - logits_max.unsqueeze(-1)  # [N, Vl], <= 0
        exp = shifted.exp()

        in_slice = (target >= start) & (target < start + local_v)
        local_target = (target - start).clamp(0, local_v - 1)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(in_slice, target_logit, torch.zeros_like(target_logit))

        # Three partial sums, one all-reduce: sum exp, target logit, sum exp * shifted.
        sums = torch.stack([exp.sum(-1), target_logit, (exp * shifted).sum(-1)])
        if tp > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
        sum_exp, target_logit, sum_exp_shifted = sums
        log_z = sum_exp.log()
        logprob = target_logit - log_z
        # H = -sum p log p = log Z - sum p * shifted
        entropy = log_z - sum_exp_shifted / sum_exp

        probs = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(probs, shifted, log_z, entropy, local_target, in_slice)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        probs, shifted, log_z, entropy, local_target, in_slice = ctx.saved_tensors
        # d logprob / d l_v = 1[v = target] - p_v
        grad = probs * (-grad_logprob.unsqueeze(-1))
        grad.scatter_add_(
            -1, local_target.unsqueeze(-1), (grad_logprob * in_slice).unsqueeze(-1).to(grad.dtype)
        )
        # d H / d l_v = -p_v (log p_v + H)
        log_p = shifted - log_z.unsqueeze(-1)
        grad -= grad_entropy.unsqueeze(-1) * probs * (log_p + entropy.unsqueeze(-1))
        return grad, None, None, None


def logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    tp_group=None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `tokens` and entropy under softmax(logits / temperature).

    logits: [B, T, V/tp] vocab-parallel (this rank's slice), any float dtype.
    tokens: [B, T] global token ids (the token each position predicts, already shifted).
    vocab_size: true vocabulary size; rows >= it (padding) are masked. None = no padding.
    Returns (logprobs [B, T], entropy [B, T]) in float32, differentiable w.r.t. logits.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree")
    b, t, local_v = logits.shape
    full_v = local_v * _group_size(tp_group)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logprob, entropy = _VocabParallelLogprobEntropy.apply(
        logits.reshape(b * t, local_v),
        tokens.reshape(b * t),
        tp_group,
        full_v if vocab_size is None else vocab_size,
    )
    return logprob.view(b, t), entropy.view(b, t)
