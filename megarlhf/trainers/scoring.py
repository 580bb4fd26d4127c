"""The scores of a rollout batch: the reward model's and the rule's, the length penalties,
and samples a rule left unscored. Layer: trainers/.

`RewardScoring` is a part of `RolloutTrainer` (trainers/rollout.py), kept here so that the
trainer's module holds roles, rollouts and the loop. It reads the trainer's `cfg`,
`reward` (frozen reward model or None), `reward_fn` (rule or None), `ctx` (role groups),
`tokenizer`, `step`, `device`, and its `_forward_rows` and `score_group_size`.
"""

from __future__ import annotations

import torch

from megarlhf.algorithms import overlong_penalty
from megarlhf.parallel.collect import gather_rows, is_row_owner, shard_rows
from megarlhf.rollout.rewards import RewardError, agree_on_failure, checked_scores
from megarlhf.trainers.rm import sequence_scores


class RewardScoring:
    @torch.no_grad()
    def score(self, batch, items) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sequence scores [N]: weighted sum of the reward model's and the rule's."""
        cfg = self.cfg
        n = batch["tokens"].shape[0]
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(n)
        if self.reward is not None:
            def per_row(out, mb):
                return sequence_scores(out[..., 0].float(), mb["last_index"])

            parts["rm_score"] = self._forward_rows(self.reward, self.ctx["reward"], batch, per_row, ())
            total += cfg.reward_model_weight * parts["rm_score"]
        if self.reward_fn is not None:
            parts["rule_score"] = self.rule_scores(batch, items)
            total += cfg.reward_fn_weight * parts["rule_score"]
            total = self.exclude_unscored(batch, total)
            unscored = torch.isnan(parts["rule_score"])
            parts["rule_score"] = parts["rule_score"].nan_to_num(0.0)
            parts["unscored_fraction"] = unscored.float()
        return total, parts

    def rule_scores(self, batch, items) -> torch.Tensor:
        """The rule reward, each sample scored once in the world (a rule may be costly or
        call a service): by the rollout DP rank that generated it, then gathered. NaN
        where the rule returned None; a rule that raises or returns NaN/inf stops the run
        on every rank (RewardError naming the rule, the prompt and the value)."""
        groups = self.ctx["rollout"]
        n = batch["tokens"].shape[0]
        rows = shard_rows(n, groups)
        owner = is_row_owner(groups)
        local, failure = None, None
        if owner:
            texts, prompts, answers = [], [], []
            for i in rows:
                p, r = int(batch["prompt_lengths"][i]), int(batch["response_lengths"][i])
                ids = [t for t in batch["tokens"][i, p : p + r].tolist() if t not in self.tokenizer.eos_ids]
                texts.append(self.tokenizer.decode(ids))
                prompts.append(items[i]["prompt_text"])
                answers.append(items[i]["answer"])
            where = [f"prompt {items[i].get('index', '?')} (row {i} of iteration {self.step + 1})" for i in rows]
            try:
                local = checked_scores(self.reward_fn, self.cfg.reward_fn, prompts, texts, answers, where)
            except RewardError as err:
                local, failure = torch.zeros(len(rows), dtype=torch.float64), str(err)
        agree_on_failure(failure, self.device)
        return gather_rows(local, rows, (n,), owner=owner, dtype=torch.float64, device=self.device).float().cpu()

    def length_penalties(self, scores: torch.Tensor, batch, section) -> torch.Tensor:
        """`scores` [B] minus the missing-EOS penalty and plus DAPO's soft overlong penalty,
        with the knobs of `section` (cfg.ppo or cfg.grpo: same field names)."""
        if section.missing_eos_penalty:
            scores = scores - section.missing_eos_penalty * (~batch["finished"]).float()
        if section.overlong_buffer_length:
            scores = scores + overlong_penalty(
                batch["response_lengths"], self.cfg.generation.response_length, section.overlong_buffer_length,
                section.overlong_penalty_factor,
            )  # fmt: skip
        return scores

    def exclude_unscored(self, batch, total: torch.Tensor) -> torch.Tensor:
        """Samples a rule scored None leave the loss: their response mask rows become 0
        (in place, so every later use of batch["mask"] sees it) and their score is the
        mean of the scored samples of their group (`score_group_size` consecutive rows),
        so group statistics (GRPO's mean) are those of the scored samples."""
        unscored = torch.isnan(total)
        if not unscored.any():
            return total
        batch["mask"].mul_((~unscored).to(batch["mask"].dtype).to(batch["mask"].device).unsqueeze(1))
        grouped = total.view(-1, self.score_group_size())
        fill = torch.nanmean(grouped, dim=1, keepdim=True).nan_to_num(0.0).expand_as(grouped)
        return torch.where(torch.isnan(grouped), fill, grouped).view(-1)
