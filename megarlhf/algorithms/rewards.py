"""Score post-processing: running moments, normalisation and clipping of sequence scores.

Layer: algorithms/ (pure torch; no process groups). Scores are [B], one per sequence.
Under data parallelism, gather the scores of all ranks before `RunningMoments.update`, or
each rank would normalise by different statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor


def normalize_scores(
    scores: Tensor, mean: float | Tensor, std: float | Tensor, eps: float = 1e-8
) -> Tensor:
    """(scores - mean) / (std + eps)."""
    return (scores - mean) / (std + eps)


def clip_scores(scores: Tensor, clip: float | None) -> Tensor:
    """Clamp scores to [-clip, clip]; None leaves them unchanged."""
    if clip is None:
        return scores
    if clip <= 0:
        raise ValueError(f"score clip must be > 0 or None, got {clip}")
    return scores.clamp(-clip, clip)


class RunningMoments:
    """Running mean and standard deviation of all scores seen so far.

    Merges each batch with Chan et al.'s parallel update (as TRL's RunningMoments does):
    with counts n_a, n_b, means m_a, m_b and sums of squared deviations M_a, M_b,

        n = n_a + n_b,  m = m_a + (m_b - m_a) * n_b / n,
        M = M_a + M_b + (m_b - m_a)^2 * n_a * n_b / n.

    `std` is unbiased (M / (n - 1)); 1.0 before any update, 0.0 after a single score.
    State stays in float64 tensors on the scores' device, so updating never syncs with
    the host; only `state_dict` reads it back (checkpoint time).
    """

    def __init__(self):
        self.count = 0
        self.mean = torch.zeros((), dtype=torch.float64)
        self.var = torch.zeros((), dtype=torch.float64)  # biased: M / n
        self.std = torch.ones((), dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Fold in a 1-D batch of scores; returns its own (mean, unbiased std) as 0-d float64."""
        if x.dim() != 1 or x.numel() == 0:
            raise ValueError(
                f"RunningMoments.update expects a non-empty 1-D tensor of scores, "
                f"got shape {tuple(x.shape)}"
            )
        x = x.to(torch.float64)
        n_b = x.numel()
        var_b, mean_b = torch.var_mean(x, correction=0)
        mean_a, var_a = self.mean.to(x.device), self.var.to(x.device)
        n_a, n = self.count, self.count + n_b

        delta = mean_b - mean_a
        m2 = var_a * n_a + var_b * n_b + delta.square() * n_a * n_b / n
        self.mean = mean_a + delta * n_b / n
        self.var = m2 / n
        self.std = (m2 / (n - 1)).sqrt() if n > 1 else torch.zeros_like(m2)
        self.count = n
        batch_std = (var_b * n_b / (n_b - 1)).sqrt() if n_b > 1 else torch.zeros_like(var_b)
        return mean_b, batch_std

    def state_dict(self) -> dict[str, float]:
        # float() reads the device tensors back: a host sync, fine at checkpoint time.
        return {
            "count": self.count,
            "mean": float(self.mean),
            "var": float(self.var),
            "std": float(self.std),
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count = int(state["count"])
        self.mean = torch.tensor(state["mean"], dtype=torch.float64)
        self.var = torch.tensor(state["var"], dtype=torch.float64)
        self.std = torch.tensor(state["std"], dtype=torch.float64)


def overlong_penalty(
    response_lengths: Tensor, max_length: int, buffer_length: int, penalty_factor: float = 1.0
) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, sec. 3.4), [B] -> [B], added to the score.

        L_exp = max_length - buffer_length
        R_i   = 0                                            |y_i| <= L_exp
                -penalty_factor * (|y_i| - L_exp) / buffer_length   L_exp < |y_i| <= max_length
                -penalty_factor                              |y_i| > max_length

    A response grows a linear penalty over the last `buffer_length` tokens before the cap
    instead of a cliff at the cap (verl's overlong_buffer: len, penalty_factor).
    """
    if buffer_length < 1 or buffer_length > max_length:
        raise ValueError(f"buffer_length must be in [1, max_length={max_length}], got {buffer_length}")
    exceed = (response_lengths.to(torch.float32) - (max_length - buffer_length)).clamp(min=0)
    return -penalty_factor * (exceed / buffer_length).clamp(max=1.0)
