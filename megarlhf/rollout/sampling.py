"""Token sampling: temperature, top-k, top-p, greedy, with one random stream per sample.

Layer: rollout/ (pure torch). Every sample owns a stream of uniforms drawn up front from
torch.Generator(seed) (`row_uniforms`); its k-th response token is drawn by inverting the
filtered softmax's CDF at its k-th uniform. So a rollout is reproducible whatever else is
in the batch (sample i's draws depend only on its own seed and position), and one step
samples every row at once, on the device that holds the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megarlhf.config import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How responses are drawn."""

    max_new_tokens: int = 32
    """Longest response (the sample stops earlier at EOS or a stop token)."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (1 = off)."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a response (in addition to the tokenizer's EOS)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens = {self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature = {self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_k = {self.top_k}, top_p = {self.top_p}: need top_k >= 0, 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """Temperature the returned log-probs (and the trainer's) use; greedy reports T=1."""
        return self.temperature if self.temperature > 0 else 1.0


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[B, V] -> [B, V] with tokens outside top-k / top-p set to -inf.

    top-p keeps the most likely tokens until their cumulative probability reaches p (the
    token that crosses p is kept), so at least one token always survives.
    """
    if top_k > 0 and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token if the tokens before it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def row_uniforms(seeds: list[int], n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, n] float64 uniforms in [0, 1): row i is the first n draws of torch.Generator(seeds[i])."""
    rows = [torch.rand(n, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
    return (torch.stack(rows) if rows else torch.empty(0, n, dtype=torch.float64)).to(device)


def sample_tokens(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> torch.Tensor:
    """[B, V] float logits, [B] uniforms in [0, 1) -> [B] token ids.

    Greedy: argmax (uniforms unused). Otherwise inverse-CDF sampling of the filtered
    softmax(logits / T): the token whose CDF interval [F(i-1), F(i)) holds u * F(V-1).
    Filtered tokens have empty intervals, so they are never drawn. The CDF is accumulated
    in float64, exact enough at any vocabulary size.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p).softmax(-1)
    cdf = probs.double().cumsum(-1)
    target = uniforms.to(cdf).unsqueeze(1) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return drawn.clamp_(max=logits.size(-1) - 1)
