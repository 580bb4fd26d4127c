"""Reward-model training (Bradley-Terry). Layer: trainers/.

Each microbatch holds B preference pairs as 2B rows (chosen first, rejected second).
The reward of a sequence is the value head's output at its last non-pad token.
loss = sum over pairs of -log sigmoid(r_chosen - r_rejected - margin)
       (+ center_rewards_coefficient * (r_chosen + r_rejected)^2), divided by the global
number of pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megarlhf.data import PreferenceDataset, collate_preference
from megarlhf.trainers.supervised import SupervisedTrainer


def sequence_scores(values: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """values [B, T] (one per token), last_index [B] -> the score of each sequence [B]."""
    return values.gather(1, last_index.unsqueeze(1)).squeeze(1)


class RewardModelTrainer(SupervisedTrainer):
    role, head, stage = "reward", "value", "rm"
    postfix_keys = ("loss", "accuracy")

    def load_dataset(self, path: str, progress: bool) -> PreferenceDataset:
        d = self.cfg.data
        return PreferenceDataset(
            path, self.tokenizer, self.template, max_length=d.max_length,
            truncation=d.truncation, on_error=d.on_error, progress=progress, columns=d.columns(),
        )  # fmt: skip

    def sample_length(self, item) -> int:
        return max(len(item["chosen_ids"]), len(item["rejected_ids"]))

    def collate(self, items, seq_length):
        mb = collate_preference(items, seq_length, self.tokenizer.pad_id)
        mb["row_weight"] = torch.ones(len(items))  # one weight per pair
        mb["attention_tokens"] = (mb["last_index"] + 1).sum().float()
        return {k: v.to(self.device) for k, v in mb.items()}

    def count(self, mb) -> torch.Tensor:
        return mb["row_weight"].sum()

    def loss(self, output, mb, n):
        scores = sequence_scores(output[..., 0].float(), mb["last_index"])
        b = scores.shape[0] // 2
        chosen, rejected = scores[:b], scores[b:]
        w = mb["row_weight"]
        gap = chosen - rejected
        per_pair = -F.logsigmoid(gap - self.cfg.margin)
        if self.cfg.center_rewards_coefficient:
            per_pair = per_pair + self.cfg.center_rewards_coefficient * (chosen + rejected) ** 2
        loss_sum = (per_pair * w).sum()
        stats = {
            "loss_sum": loss_sum.detach(),
            "correct": ((gap > 0).float() * w).sum(),
            "margin_sum": (gap.detach() * w).sum(),
            "chosen_sum": (chosen.detach() * w).sum(),
            "rejected_sum": (rejected.detach() * w).sum(),
            "pairs": w.sum(),
        }
        return loss_sum / n, stats

    def metrics(self, sums, prefix=""):
        pairs = max(sums["pairs"], 1.0)
        return {
            f"{prefix}loss": sums["loss_sum"] / pairs,
            f"{prefix}accuracy": sums["correct"] / pairs,
            f"{prefix}margin": sums["margin_sum"] / pairs,
            f"{prefix}rewards_chosen": sums["chosen_sum"] / pairs,
            f"{prefix}rewards_rejected": sums["rejected_sum"] / pairs,
        }
