"""In-process generation on a Megatron-Core GPTModel with a KV cache.

Layer: rollout/. The engine runs on the actor's own parameters (no copy, no trip through
disk) when the actor's layout is TP-only; a PP actor generates through a TP-only copy
that weight refit keeps in sync. KV cache: Megatron-Core's `StaticInferenceContext`.

Prompts of different lengths share one batch: they are right-aligned behind left
padding, ONE prefill covers every prompt, and every row samples from the first decode
step on, with an attention mask that hides the padding keys. Under RoPE a row's shift is
invisible (scores depend on relative positions only); learned absolute positions get
per-row position ids. That needs a core attention that applies a mask: megarlhf's SDPA
attention. Models built with another one (Transformer Engine's, Megatron's unfused; they
take a mask *type*) generate through SDPA twins of it, swapped in for the call (core
attention has no weights; `models.attention.sdpa_twins`). Only a model whose attention
cannot be swapped falls back to what Megatron's static engine does: prefill up to the
shortest prompt, then step one position at a time for everyone, a sample still inside
its prompt being fed its own prompt token (forced). Either way the returned rows are
prompt, response, then padding.

With `cuda_graphs=True` every decode step has one shape
(`FixedShapeDecodeContext`: the cache column comes from a device tensor, attention spans
the whole cache under a mask), so on a GPU the step is captured once per `generate` call in
a CUDA graph and replayed: one launch per token instead of a few hundred kernel launches
from Python. On CPU the same fixed-shape step runs eagerly (that is how the CPU tests
check it against the default path).

With `compile=True` the same fixed-shape decode step goes through `torch.compile`
(Inductor): fused elementwise kernels and one compiled call per token instead of the
layer-by-layer Python of Megatron's modules; the prefill is a second compiled graph. The
first `generate` pays the compile (~10–30 s for a small model on CPU; a second shape
compiles once more, with dynamic batch and length, and then no more); afterwards a decode
step of the examples' 0.6M model runs ~3x faster on CPU. With `cuda_graphs` too, the
compiled step is what the graph captures.

Returned log-probs are those of the sampled tokens under softmax(logits / T) over the
whole (unpadded) vocabulary — exactly what the trainer recomputes, so PPO's first
importance ratio is 1. Top-k/top-p only decide which token is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext

from megarlhf.models.attention import FixedShapeDecodeContext, sdpa_twins
from megarlhf.models.compile import torch_compile
from megarlhf.parallel import compat, cpu_compat
from megarlhf.parallel.layout import RoleGroups
from megarlhf.rollout.sampling import SamplingParams, row_uniforms, sample_tokens


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
    entropies: torch.Tensor
    """[B, T] entropy of the (temperature-scaled) distribution each response token was drawn from."""
    finish_reasons: list[str]
    """'stop' (EOS or a stop token) or 'length' (max_new_tokens reached)."""

    def response_ids(self, i: int) -> list[int]:
        p, n = int(self.prompt_lengths[i]), int(self.response_lengths[i])
        return self.tokens[i, p : p + n].tolist()


def _shift_left(x: torch.Tensor, offset: torch.Tensor, fill) -> torch.Tensor:
    """Row i of [B, T] moved left by offset[i], `fill` entering on the right."""
    cols = torch.arange(x.shape[1], device=x.device).unsqueeze(0) + offset.unsqueeze(1)
    out = x.gather(1, cols.clamp(max=x.shape[1] - 1))
    return out.masked_fill(cols >= x.shape[1], fill)


class GenerationEngine:
    """Batched autoregressive generation with a KV cache on a TP-only GPTModel."""

    def __init__(
        self,
        model: torch.nn.Module,
        groups: RoleGroups,
        *,
        vocab_size: int,
        eos_id: int | Sequence[int],
        pad_id: int,
        cuda_graphs: bool = False,
        compile: bool = False,
    ):
        if groups.layout.pp != 1:
            raise ValueError(
                f"the generation engine runs on a TP-only layout, got {groups.layout}: generate "
                f"with a TP-only copy of the model kept in sync by weight refit"
            )
        self.model = model
        self.groups = groups
        self.vocab_size = vocab_size
        # Every EOS id stops a sample (generation_config.json may list several: Llama-3's
        # <|end_of_text|> and <|eot_id|>); eos_id is the first.
        self.eos_ids = (eos_id,) if isinstance(eos_id, int) else tuple(int(i) for i in eos_id)
        self.eos_id = self.eos_ids[0]
        self.pad_id = pad_id
        # Left padding needs a core attention that applies the mask it is given in prefill
        # and decode alike; see the module docstring.
        self._twins = sdpa_twins(model)
        self.left_pad = self._twins is not None
        for flag, on in (("cuda_graphs", cuda_graphs), ("compile", compile)):
            if on and not self.left_pad:
                raise ValueError(
                    f"generation.{flag} needs megarlhf's layer spec (its self-attention takes an "
                    f"SDPA core attention for generation); this model has another attention "
                    f"module: set generation.{flag}=false"
                )
        self.cuda_graphs = cuda_graphs
        self.compile = compile
        self._compiled_logits = None
        if compile:
            self._compiled_logits = torch_compile(self._logits)
        self.graphs_captured = 0  # decode-step CUDA graphs captured so far (one per generate call)

    @property
    def _forward_logits(self):
        """`_logits` through torch.compile under `compile=True` (prefill and fixed-shape
        decode steps: a graph each), else `_logits` itself."""
        return self._compiled_logits or self._logits

    def _logits(self, tokens: torch.Tensor, positions: torch.Tensor, ctx, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last-position logits [B, V] (true vocabulary only), gathered over TP. `mask`:
        [B, 1, sq, sk], True where attention is blocked."""
        out = self.model(tokens, positions, mask, inference_context=ctx, runtime_gather_output=True)
        return out[:, -1, : self.vocab_size].float()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> Rollouts:
        """Generate one response per prompt; sample i draws from torch.Generator(seeds[i])'s stream."""
        with cpu_compat.fast_path(), compat.inference_mode(), self._mask_taking_attention():
            return self._generate(prompts, params, seeds)

    @contextmanager
    def _mask_taking_attention(self):
        """SDPA twins in place of core attentions that take no mask, for one call."""
        swap = self._twins if self.left_pad else []
        originals = [attn.core_attention for attn, _ in swap]
        for attn, twin in swap:
            attn.core_attention = twin
        try:
            yield
        finally:
            for (attn, _), original in zip(swap, originals):
                attn.core_attention = original

    def _generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> Rollouts:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token (e.g. BOS)")
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        b = len(prompts)
        lengths = [len(p) for p in prompts]
        max_prompt = max(lengths)
        total = max_prompt + params.max_new_tokens
        # Row i's prompt starts at offset[i]: 0 (prompt-first rows), or max_prompt - its
        # length when left-padded (every prompt then ends at max_prompt).
        left = self.left_pad and min(lengths) < max_prompt
        offsets = [max_prompt - n if left else 0 for n in lengths]
        offset = torch.tensor(offsets, device=device)
        prompt_lengths = torch.tensor(lengths, device=device)
        tokens = torch.full((b, total), self.pad_id, dtype=torch.long)
        for i, (p, o) in enumerate(zip(prompts, offsets)):
            tokens[i, o : o + len(p)] = torch.tensor(p)
        tokens = tokens.to(device)
        positions = (torch.arange(total, device=device) - offset.unsqueeze(1)).clamp(min=0)
        # Keys a row may attend to: everything from its prompt's start on.
        blocked_keys = (torch.arange(total, device=device) < offset.unsqueeze(1))[:, None, None, :]
        logprobs = torch.zeros(b, total, device=device)
        entropies = torch.zeros(b, total, device=device)
        response_mask = torch.zeros(b, total, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        stopped_any = torch.zeros(b, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(sorted({*self.eos_ids, *params.stop_token_ids}), device=device)
        # Row i's k-th response token is drawn with uniforms[i, k]: its own seed's stream.
        uniforms = row_uniforms(seeds, params.max_new_tokens, device)
        rows = torch.arange(b, device=device)
        prompt_end = offset + prompt_lengths  # first response position of each row
        last_position = prompt_end + params.max_new_tokens - 1  # per-sample length budget

        fixed = (self.cuda_graphs or self.compile) and self.left_pad
        ctx = FixedShapeDecodeContext(b, total, device) if fixed else StaticInferenceContext(b, total)
        start = max_prompt if left else min(lengths)
        mask = None
        if left:  # causal, padding keys hidden (a padding query sees itself: no empty rows)
            causal = torch.ones(start, start, dtype=torch.bool, device=device).triu(1)
            mask = causal | (blocked_keys[..., :start] & ~torch.eye(start, dtype=torch.bool, device=device))
        logits = self._forward_logits(tokens[:, :start], positions[:, :start], ctx, mask)
        ctx.increment_sequence_len_offset(start)
        step = _FixedShapeStep(self, ctx, blocked_keys) if fixed else None
        for t in range(start, total):
            # `logits` predict position t. Samples still in their prompt keep their token.
            generating = (prompt_end <= t) & ~done
            k = (t - prompt_end).clamp(0, params.max_new_tokens - 1)
            drawn = sample_tokens(logits, params, uniforms[rows, k])
            logp = torch.log_softmax(logits / params.logprob_temperature, dim=-1)
            chosen = logp.gather(1, drawn.unsqueeze(1)).squeeze(1)
            tokens[:, t] = torch.where(generating, drawn, tokens[:, t])
            logprobs[:, t] = torch.where(generating, chosen, logprobs[:, t])
            entropies[:, t] = torch.where(generating, -(logp.exp() * logp).sum(-1), 0.0)
            response_mask[:, t] = generating.float()
            stopped = generating & torch.isin(drawn, stop_ids)
            stopped_any |= stopped
            done |= stopped | (generating & (t >= last_position))
            if t == total - 1 or bool(done.all()):
                break
            ctx.enable_decode_mode()
            if step is not None:
                logits = step(t, tokens[:, t : t + 1], positions[:, t : t + 1])
            else:
                step_mask = blocked_keys[..., : t + 1] if left else None
                logits = self._logits(tokens[:, t : t + 1], positions[:, t : t + 1], ctx, step_mask)
            ctx.increment_sequence_len_offset(1)
        if left:  # back to prompt-first rows
            tokens, logprobs, entropies, response_mask = (
                _shift_left(x, offset, fill) for x, fill in
                ((tokens, self.pad_id), (logprobs, 0.0), (entropies, 0.0), (response_mask, 0.0))
            )  # fmt: skip
        if was_training:
            self.model.train()
        self._check_tp_agreement(tokens)
        return Rollouts(
            tokens=tokens.cpu(),
            prompt_lengths=prompt_lengths.cpu(),
            response_lengths=response_mask.sum(1).long().cpu(),
            response_mask=response_mask.cpu(),
            logprobs=logprobs.cpu(),
            entropies=entropies.cpu(),
            finish_reasons=["stop" if s else "length" for s in stopped_any.tolist()],
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


class _FixedShapeStep:
    """The decode step of one `generate` call with every input in a persistent buffer:
    token and position ids [B, 1], the cache column, the key mask [B, 1, 1, T]. With
    `cuda_graphs` on a GPU the first call captures the model's forward (compiled or not) in
    a CUDA graph and every call replays it; otherwise every call runs the forward."""

    def __init__(self, engine: GenerationEngine, ctx: FixedShapeDecodeContext, blocked_keys: torch.Tensor):
        self.engine, self.ctx = engine, ctx
        self.blocked_keys = blocked_keys  # [B, 1, 1, T]: padding columns of each row
        b, total = blocked_keys.shape[0], blocked_keys.shape[-1]
        device = blocked_keys.device
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros_like(blocked_keys)
        self.columns = torch.arange(total, device=device)
        self.graph = None
        self.logits = None
        self.use_graph = engine.cuda_graphs and device.type == "cuda"

    def _forward(self) -> torch.Tensor:
        return self.engine._forward_logits(self.tokens, self.positions, self.ctx, self.mask)

    def __call__(self, t: int, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.ctx.position.fill_(t)
        torch.logical_or(self.blocked_keys, self.columns > t, out=self.mask)
        if not self.use_graph:
            return self._forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        # Warm up on a side stream (allocator and library state), then capture. Both write
        # this step's key/value to its cache column: the same values the replay writes.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        self.engine.graphs_captured += 1
