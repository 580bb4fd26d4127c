"""Supervised fine-tuning. Layer: trainers/.

Objective: mean negative log-likelihood of the response (assistant) tokens over the
*global* batch: sum over all DP ranks and microbatches of -log p(token) on masked
positions, divided by the global number of those positions.
"""

from __future__ import annotations

import torch

from megarlhf.data import SFTDataset, collate_sft
from megarlhf.models.logprobs import logprobs_and_entropy
from megarlhf.trainers.supervised import SupervisedTrainer


class SFTTrainer(SupervisedTrainer):
    role, head, stage = "actor", "lm", "sft"

    def load_dataset(self, path: str, progress: bool) -> SFTDataset:
        d = self.cfg.data
        return SFTDataset(
            path, self.tokenizer, self.template, max_length=d.max_length,
            truncation=d.truncation, on_error=d.on_error, progress=progress, columns=d.columns(),
        )  # fmt: skip

    def sample_length(self, item) -> int:
        return len(item["input_ids"])

    def collate(self, items, seq_length):
        mb = collate_sft(items, seq_length, self.tokenizer.pad_id)
        mb["row_weight"] = torch.ones(len(items))
        mb["attention_tokens"] = torch.tensor(float(sum(len(it["input_ids"]) for it in items)))
        return {k: v.to(self.device) for k, v in mb.items()}

    def _mask(self, mb) -> torch.Tensor:
        # Position t predicts token t+1, so the target mask is the loss mask shifted by one.
        return mb["loss_mask"][:, 1:] * mb["row_weight"][:, None]

    def count(self, mb) -> torch.Tensor:
        return self._mask(mb).sum()

    def loss(self, output, mb, n):
        logprobs, _ = logprobs_and_entropy(
            output[:, :-1], mb["tokens"][:, 1:], tp_group=self.groups.tp, vocab_size=self.cfg.model.vocab_size
        )
        mask = self._mask(mb)
        nll = -(logprobs * mask).sum()
        return nll / n, {"nll": nll.detach(), "tokens": mask.sum()}

    def metrics(self, sums, prefix=""):
        return {f"{prefix}loss": sums["nll"] / max(sums["tokens"], 1.0)}
