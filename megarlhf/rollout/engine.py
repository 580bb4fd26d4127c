"""In-process generation on a Megatron-Core GPTModel with a KV cache.

Layer: rollout/. The engine runs on the actor's own parameters (no copy, no trip through
disk) when the actor's layout is TP-only; a PP actor generates through a TP-only copy
that weight refit keeps in sync. KV cache: Megatron-Core's `StaticInferenceContext`.

Prompts of different lengths share one batch the way Megatron's static engine does it:
prefill up to the shortest prompt, then step one position at a time for everyone; a
sample still inside its prompt is fed its own prompt token (forced), the others sample.
Each sequence stays contiguous (prompt, response, then padding), so plain causal
attention is exact and the KV cache never holds a padding token before a real one.

Returned log-probs are those of the sampled tokens under softmax(logits / T) over the
whole (unpadded) vocabulary — exactly what the trainer recomputes, so PPO's first
importance ratio is 1. Top-k/top-p only decide which token is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext

from megarlhf.parallel.layout import RoleGroups
from megarlhf.rollout.sampling import SamplingParams, sample_tokens


@dataclass
class Rollouts:
    """A batch of prompt + response sequences. Position t of `logprobs` is the log-prob
    of `tokens[:, t]` given the tokens before it (0 outside the response)."""

    tokens: torch.Tensor
    """[B, T] prompt, then response, then pad."""
    prompt_lengths: torch.Tensor
    """[B]"""
    response_lengths: torch.Tensor
    """[B] tokens generated, including a final EOS/stop token."""
    response_mask: torch.Tensor
    """[B, T] 1.0 on response tokens."""
    logprobs: torch.Tensor
    """[B, T] log-prob of each response token under the sampling policy (temperature-scaled)."""
    finish_reasons: list[str]
    """'stop' (EOS or a stop token) or 'length' (max_new_tokens reached)."""

    def response_ids(self, i: int) -> list[int]:
        p, n = int(self.prompt_lengths[i]), int(self.response_lengths[i])
        return self.tokens[i, p : p + n].tolist()


class GenerationEngine:
    """Batched autoregressive generation with a KV cache on a TP-only GPTModel."""

    def __init__(self, model: torch.nn.Module, groups: RoleGroups, *, vocab_size: int, eos_id: int, pad_id: int):
        if groups.layout.pp != 1:
            raise ValueError(
                f"the generation engine runs on a TP-only layout, got {groups.layout}: generate "
                f"with a TP-only copy of the model kept in sync by weight refit"
            )
        self.model = model
        self.groups = groups
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.pad_id = pad_id

    def _logits(self, tokens: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """Last-position logits [B, V] (true vocabulary only), gathered over TP."""
        out = self.model(tokens, positions, None, inference_context=ctx, runtime_gather_output=True)
        return out[:, -1, : self.vocab_size].float()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> Rollouts:
        """Generate one response per prompt; sample i draws from torch.Generator(seeds[i])."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token (e.g. BOS)")
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        b = len(prompts)
        prompt_lengths = torch.tensor([len(p) for p in prompts])
        max_prompt = int(prompt_lengths.max())
        total = max_prompt + params.max_new_tokens
        tokens = torch.full((b, total), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        positions = torch.arange(total).expand(b, total)
        logprobs = torch.zeros(b, total)
        response_mask = torch.zeros(b, total)
        done = torch.zeros(b, dtype=torch.bool)
        finish = ["length"] * b
        stop_ids = torch.tensor(sorted({self.eos_id, *params.stop_token_ids}))
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        last_position = prompt_lengths + params.max_new_tokens - 1  # per-sample length budget

        ctx = StaticInferenceContext(b, total)
        start = int(prompt_lengths.min())
        logits = self._logits(tokens[:, :start].to(device), positions[:, :start].to(device), ctx)
        ctx.increment_sequence_len_offset(start)
        for t in range(start, total):
            # `logits` predict position t. Samples still in their prompt keep their token.
            logits = logits.cpu()
            generating = (prompt_lengths <= t) & ~done
            # Draw only for samples that generate: sample i's RNG stream then depends on
            # nothing but its own seed, whatever else shares the batch.
            drawn = torch.full((b,), self.pad_id, dtype=torch.long)
            rows = generating.nonzero().flatten().tolist()
            if rows:
                drawn[rows] = sample_tokens(logits[rows], params, [generators[i] for i in rows])
            logp = torch.log_softmax(logits / params.logprob_temperature, dim=-1)
            chosen = logp.gather(1, drawn.unsqueeze(1)).squeeze(1)
            tokens[:, t] = torch.where(generating, drawn, tokens[:, t])
            logprobs[:, t] = torch.where(generating, chosen, logprobs[:, t])
            response_mask[:, t] = generating.float()
            stopped = generating & torch.isin(drawn, stop_ids)
            for i in stopped.nonzero().flatten().tolist():
                finish[i] = "stop"
            done |= stopped | (generating & (t >= last_position))
            if bool(done.all()) or t == total - 1:
                break
            ctx.enable_decode_mode()
            logits = self._logits(tokens[:, t : t + 1].to(device), positions[:, t : t + 1].to(device), ctx)
            ctx.increment_sequence_len_offset(1)
        if was_training:
            self.model.train()
        self._check_tp_agreement(tokens)
        return Rollouts(
            tokens=tokens,
            prompt_lengths=prompt_lengths,
            response_lengths=response_mask.sum(1).long(),
            response_mask=response_mask,
            logprobs=logprobs,
            finish_reasons=finish,
        )

    def _check_tp_agreement(self, tokens: torch.Tensor) -> None:
        """TP ranks sample from identical gathered logits with identical seeds; a mismatch
        would mean diverged weights. Cheap: one all-reduce of a checksum."""
        if self.groups.layout.tp == 1:
            return
        checksum = tokens.double().sum().reshape(1).to(next(self.model.parameters()).device)
        lo, hi = checksum.clone(), checksum.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.groups.tp)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.groups.tp)
        if lo.item() != hi.item():
            raise RuntimeError("tensor-parallel ranks generated different tokens: their weights differ")
