"""GRPO and its critic-free relatives (Dr. GRPO, RLOO, REINFORCE++). Layer: trainers/.

`GRPOTrainer.update()` is the algorithm after generation, top to bottom (Shao et al. 2024):

    score      reward (model and/or rule) of each of the num_generations responses per
               prompt; reference log-probs when beta > 0; sampling-time log-probs when
               the batch is trained on more than once; the engine-vs-trainer mismatch
               (rollout_correction/*, RolloutTrainer.measure_mismatch)
    advantages relative to the group (grpo, dr_grpo, rloo: one value per response,
               spread over its tokens) or to the batch (reinforce_pp: KL-shaped returns,
               normalised over all response tokens); groups with equal rewards and
               truncated responses optionally leave the loss
    train      num_iterations x minibatches: the policy objective of grpo.policy_loss
               (PPO's clip, GSPO, GSPO-token, CISPO, SAPO: algorithms.POLICY_OBJECTIVES;
               token- or sequence-level aggregation), weighted by the rollout correction's
               importance weights when on, + beta x KL(k3) to the reference, one
               optimizer step each

No critic, no value head, no GAE. The loop around it (generate -> update -> refit,
evaluation, checkpoints, metrics) and the roles' set-up are shared with PPO in
trainers/rollout.py; a prompt's num_generations responses sit on consecutive rows, each
with its own seed, so every group is whole in the replicated batch.
"""

from __future__ import annotations

from functools import partial

import torch

from megarlhf.algorithms import (
    GROUP_ADVANTAGE_ESTIMATORS,
    POLICY_OBJECTIVES,
    broadcast_to_tokens,
    entropy_loss,
    filter_uniform_groups,
    grpo_advantages,
    kl_loss,
    kl_penalty,
    masked_sum,
    reinforce_pp_advantages,
)
from megarlhf.config import GRPOConfig
from megarlhf.parallel.collect import shard_rows
from megarlhf.trainers.rollout import PhaseTimer, RolloutTrainer


class GRPOTrainer(RolloutTrainer):
    stage = "grpo"
    shown_keys = ("objective/scores", "objective/reward_std", "objective/frac_reward_zero_std", "objective/kl",
                  "policy/clipfrac", "objective/entropy", "response_length", "time/iteration")  # fmt: skip

    def __init__(self, cfg: GRPOConfig, resume: str | None = None):
        super().__init__(cfg, resume)

    @property
    def uses_reference(self) -> bool:
        return self.cfg.grpo.beta > 0

    @property
    def passes(self) -> int:
        return self.cfg.grpo.num_iterations

    @property
    def on_policy(self) -> bool:
        """One optimizer step per batch: the policy that trains is the one that sampled,
        so the training pass's own log-probs, detached, are the old ones (ratio = 1) and
        no extra forward pass is needed. REINFORCE++ with beta > 0 needs them before
        training, for the KL in its reward."""
        g = self.cfg.grpo
        return g.num_iterations == 1 and g.num_mini_batches == 1 and not (g.in_reward_kl and g.beta > 0)

    def rollout_items(self, items: list[dict]) -> list[dict]:
        """Each prompt num_generations times, on consecutive rows (one group)."""
        return [it for it in items for _ in range(self.cfg.grpo.num_generations)]

    def score_group_size(self) -> int:
        return self.cfg.grpo.num_generations

    def describe(self) -> str:
        g = self.cfg.grpo
        return (
            f"{super().describe()}; {g.num_generations} responses per prompt, {g.advantage_estimator} "
            f"advantages, {g.num_iterations} iterations x {g.num_mini_batches} minibatches"
        )

    # --- one GRPO update -----------------------------------------------------------------
    def update(self, batch: dict[str, torch.Tensor], items: list[dict], timer: PhaseTimer | None = None) -> dict[str, float]:
        """Everything after generation: score, advantages, num_iterations x minibatches."""
        g = self.cfg.grpo
        timer = timer or PhaseTimer()
        mask, finished = batch["mask"], batch["finished"]
        ref_logprobs = old_logprobs = None
        with timer("score"), self._frozen_on_device():
            with timer("score/reward"):
                raw_scores, score_parts = self.score(batch, items)
            if self.reference is not None:
                with timer("score/reference"):
                    ref_logprobs, _ = self.policy_logprobs(self.reference, self.ctx["reference"], batch)
            if not self.on_policy:
                with timer("score/actor"):
                    old_logprobs, _ = self.sampling_logprobs(batch)
            old_logprobs, is_weights, mismatch = self.measure_mismatch(batch, old_logprobs, timer)

        with timer("advantages"):
            scores = self.shape_scores(raw_scores, batch)
            loss_mask = mask
            if g.mask_truncated_completions:
                loss_mask = loss_mask * finished.unsqueeze(1).float()
            keep = filter_uniform_groups(scores, g.num_generations)
            if g.filter_groups:
                loss_mask = loss_mask * keep.unsqueeze(1).float()
            advantages = self.advantages(scores, loss_mask, old_logprobs, ref_logprobs)

        with timer("train"), self._training():
            train_stats = self.train_on(batch, loss_mask, advantages, old_logprobs, ref_logprobs, is_weights)
        batch["scores"], batch["rewards"], batch["advantages"] = raw_scores, scores, advantages  # for rollout dumps

        grouped = scores.view(-1, g.num_generations)
        return {
            "objective/scores": raw_scores.mean().item(),
            **{f"objective/{k}": v.mean().item() for k, v in score_parts.items()},
            "objective/reward_std": grouped.std(dim=1).mean().item(),
            "objective/frac_reward_zero_std": 1.0 - keep.float().mean().item(),
            "objective/trained_fraction": (loss_mask.sum(1) > 0).float().mean().item(),
            **train_stats,
            **mismatch,
            "response_length": batch["response_lengths"].float().mean().item(),
            "eos_fraction": finished.float().mean().item(),
        }

    def shape_scores(self, raw_scores: torch.Tensor, batch) -> torch.Tensor:
        """Missing-EOS penalty and DAPO's soft overlong penalty on the sequence scores."""
        return self.length_penalties(raw_scores, batch, self.cfg.grpo)

    def advantages(self, scores, loss_mask, old_logprobs, ref_logprobs) -> torch.Tensor:
        """[N] scores -> [N, T] advantages on the loss's tokens (0 elsewhere)."""
        g = self.cfg.grpo
        if g.in_reward_kl:
            if g.advantage_estimator == "reinforce_pp_baseline":
                scores = grpo_advantages(scores, g.num_generations, scale_by_std=False)
            kl = kl_penalty(old_logprobs, ref_logprobs, g.kl_estimator) if g.beta > 0 else None
            return reinforce_pp_advantages(scores, loss_mask, kl, g.beta)
        per_sequence = GROUP_ADVANTAGE_ESTIMATORS[g.advantage_estimator](scores, g.num_generations)
        return broadcast_to_tokens(per_sequence, loss_mask)

    # --- train ---------------------------------------------------------------------------
    def actor_loss(self, output, mb, n, n_seq):
        """The policy objective (grpo.policy_loss, weighted by the rollout correction's
        importance weights when on) + beta x KL to the reference + entropy bonus."""
        g = self.cfg.grpo
        logprobs, entropy = self._token_logprobs(output, mb["tokens"], self.ctx["actor"])
        mask = mb["loss_mask"]
        old = mb["old_logprobs"] if "old_logprobs" in mb else logprobs.detach()
        aggregate = {"aggregation": g.loss_aggregation, "num_sequences": n_seq}
        loss, stats = POLICY_OBJECTIVES[g.policy_loss](
            logprobs, old, mb["advantages"], mask, n, weights=mb.get("is_weights"), **g.objective_knobs, **aggregate,
        )  # fmt: skip
        if "ref_logprobs" in mb:
            kl, kl_stats = kl_loss(logprobs, mb["ref_logprobs"], mask, n, g.kl_estimator, **aggregate)
            if not g.in_reward_kl:
                loss = loss + g.beta * kl
            stats.update(kl_stats)
            # Per response (summed over its tokens, averaged over responses), like PPO's.
            seq_kl = kl_penalty(logprobs.detach(), mb["ref_logprobs"], g.kl_estimator)
            stats["objective/kl"] = masked_sum(seq_kl, mask) / n_seq
        ent_loss, ent_stats = entropy_loss(entropy, mask, n)
        if g.entropy_coef:
            loss = loss + g.entropy_coef * ent_loss
        stats["objective/entropy"] = ent_stats["objective/entropy"]
        return loss, stats

    def train_on(self, batch, loss_mask, advantages, old_logprobs, ref_logprobs, is_weights=None) -> dict[str, float]:
        """num_iterations x minibatches: one actor optimizer step per minibatch. A
        minibatch whose every response left the loss (filter_groups,
        mask_truncated_completions) is skipped: no gradient, no step."""
        cfg, g = self.cfg, self.cfg.grpo
        n, size = batch["tokens"].shape[0], cfg.mini_batch_size
        extra = {"loss_mask": loss_mask, "advantages": advantages}
        if old_logprobs is not None:
            extra["old_logprobs"] = old_logprobs
        if ref_logprobs is not None:
            extra["ref_logprobs"] = ref_logprobs
        if is_weights is not None:
            extra["is_weights"] = is_weights
        groups = self.ctx["actor"]
        sums: dict[str, float] = {}
        steps = 0
        for it in range(g.num_iterations):
            for minibatch in self.minibatches(n, size, g.num_mini_batches, it):
                num_tokens = loss_mask[minibatch].sum()
                if num_tokens == 0:
                    continue
                num_sequences = (loss_mask[minibatch].sum(1) > 0).sum()
                mine = [minibatch[i] for i in shard_rows(size, groups)]
                mbs = self._microbatches(batch, mine, extra, groups)
                loss_fn = partial(self.actor_loss, n=num_tokens.to(self.device), n_seq=num_sequences.to(self.device))
                for key, v in self.actor.train_step(mbs, loss_fn).items():
                    name = key if "/" in key else f"actor/{key}"
                    sums[name] = sums.get(name, 0.0) + v
                steps += 1
        out = {k: v / steps for k, v in sums.items()} if steps else {}
        out["actor/steps"] = float(steps)
        return out
