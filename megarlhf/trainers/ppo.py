"""PPO with four roles: actor, critic, reference, reward. Layer: trainers/.

`PPOTrainer.update()` is the algorithm after generation, top to bottom (Ouyang et al. 2022):

    score      reward (model and/or rule), reference log-probs, actor log-probs, values;
               the engine-vs-trainer mismatch (rollout_correction/*)
    shape      r_t = -beta * KL_t on every response token, + the score on the last one
    GAE        advantages and returns (gamma, lambda); whiten the advantages
    train      ppo_epochs x minibatches: the policy objective of ppo.policy_loss (PPO's
               clip by default; weighted by the rollout correction when on) (+ entropy bonus) for the
               actor, clipped value loss for the critic, one optimizer step each
    adapt      the KL controller moves beta towards its target

The loop around it (generate one response per prompt with the rollout engine on the
actor's weights -> update -> refit the engine; evaluation, checkpoints, metrics) and the
roles' set-up are shared with GRPO in trainers/rollout.py. Each role lives at its own
TP/PP layout on the same ranks; losses are sums over tokens divided by the minibatch's
(global) token count.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import torch

from megarlhf.algorithms import (
    POLICY_OBJECTIVES,
    RunningMoments,
    clip_scores,
    entropy_loss,
    gae,
    kl_penalty,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    normalize_scores,
    sft_loss,
    shape_rewards,
    value_loss,
)
from megarlhf.checkpoint.dist_ckpt import checkpoint_model_config, load_model_weights, resolve_checkpoint
from megarlhf.config import ConfigError, PPOConfig
from megarlhf.data import SFTDataset, ShardedSampler
from megarlhf.engine.engine import TrainEngine
from megarlhf.models.backbone import build_model
from megarlhf.parallel import Layout
from megarlhf.parallel.collect import shard_rows
from megarlhf.trainers.ppo_batches import ptx_microbatches
from megarlhf.trainers.rollout import PhaseTimer, RolloutTrainer, shift


class PPOTrainer(RolloutTrainer):
    stage = "ppo"
    shown_keys = ("objective/scores", "objective/kl", "objective/kl_coef", "objective/entropy",
                  "policy/clipfrac", "val/vf_loss", "response_length", "time/iteration")  # fmt: skip
    plot_keys = ("objective/scores", "objective/kl", "eval/score")

    def __init__(self, cfg: PPOConfig, resume: str | None = None):
        self.kl_ctl = make_kl_controller(cfg.ppo.kl_coef, cfg.ppo.adap_kl_ctrl, cfg.ppo.target, cfg.ppo.horizon)
        self.moments = RunningMoments()
        super().__init__(cfg, resume)

    # --- set-up -------------------------------------------------------------------------
    def extra_layouts(self) -> dict[str, Layout]:
        return {"critic": Layout(*self.cfg.critic_layout.resolve(self.cfg.layout))}

    def trainables(self) -> dict[str, TrainEngine]:
        return {"actor": self.actor, "critic": self.critic}

    @property
    def passes(self) -> int:
        return self.cfg.ppo.num_ppo_epochs

    def state_dict(self) -> dict[str, Any]:
        return {
            "kl_ctl": self.kl_ctl.state_dict(),
            "moments": self.moments.state_dict(),
            "ptx_sampler": self.ptx_sampler.state_dict() if self.ptx_sampler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.moments.load_state_dict(state["moments"])
        if self.ptx_sampler is not None:
            self.ptx_sampler.load_state_dict(state["ptx_sampler"])

    def _load_data(self) -> None:
        super()._load_data()
        cfg = self.cfg
        self.ptx_data = self.ptx_sampler = None
        if cfg.ptx_rows:
            self.ptx_data = SFTDataset(
                cfg.ptx_file, self.tokenizer, self.template, max_length=cfg.model.max_seq_length,
                truncation="error", on_error=cfg.data.on_error, progress=self.ctx.is_main,
                columns=cfg.data.columns(),
            )  # fmt: skip
            self.ptx_sampler = ShardedSampler(len(self.ptx_data), cfg.ptx_rows, 0, 1, seed=cfg.train.seed + 1)

    def _check_batch_sizes(self) -> int:
        cfg = self.cfg
        need = cfg.train.micro_batch_size * self.ctx["actor"].layout.dp
        if cfg.ptx_rows % need:
            raise ConfigError(
                f"ptx_batch_size = {cfg.ptx_rows} does not split over the actor's "
                f"{self.ctx['actor'].layout.dp} data-parallel ranks x micro_batch_size "
                f"{cfg.train.micro_batch_size}: make it a multiple of {need}"
            )
        return super()._check_batch_sizes()

    def _build_models(self) -> None:
        """Actor, reference, reward and engine (RolloutTrainer), then the critic: from
        value_model_path, else the reward model, else the SFT body with a fresh value head."""
        super()._build_models()
        cfg, ctx = self.cfg, self.ctx
        value_path = cfg.value_model_path or cfg.reward_model_path
        if value_path:
            # Shape from the checkpoint, dtype from this run (as for the reward model).
            critic_cfg = replace(checkpoint_model_config(value_path), params_dtype=cfg.model.params_dtype)
            critic = build_model(critic_cfg, ctx["critic"], "value")
            saved = "critic" if (resolve_checkpoint(value_path) / "critic").is_dir() else "reward"
            load_model_weights(critic, ctx["critic"], value_path, saved)
        else:
            critic = build_model(cfg.model, ctx["critic"], "value")
            load_model_weights(critic, ctx["critic"], cfg.sft_model_path, "actor", exclude=("output_layer.",))
        self.critic = TrainEngine(
            critic, ctx["critic"], cfg.critic_optim, cfg.optimizer_steps, compile=cfg.train.compile
        )

    def describe(self) -> str:
        ppo = self.cfg.ppo
        return f"{super().describe()}; {ppo.num_ppo_epochs} epochs x {ppo.num_mini_batches} minibatches"

    # --- one PPO update ------------------------------------------------------------------
    def update(self, batch: dict[str, torch.Tensor], items: list[dict], timer: PhaseTimer | None = None) -> dict[str, float]:
        """Everything after generation: score, shape, GAE, PPO epochs, KL controller."""
        ppo = self.cfg.ppo
        timer = timer or PhaseTimer()
        mask = batch["mask"]
        with timer("score"), self._frozen_on_device():
            with timer("score/reward"):
                raw_scores, score_parts = self.score(batch, items)
            with timer("score/reference"):
                ref_logprobs, _ = self.policy_logprobs(self.reference, self.ctx["reference"], batch)
            with timer("score/actor"):
                old_logprobs, entropy = self.sampling_logprobs(batch)
            with timer("score/critic"):
                old_values = self.values(batch)
            old_logprobs, is_weights, mismatch = self.measure_mismatch(batch, old_logprobs, timer)

        with timer("advantages"):
            scores = self.transform_scores(raw_scores, batch)
            kl = torch.where(mask.bool(), kl_penalty(old_logprobs, ref_logprobs, ppo.kl_estimator), 0.0)
            rewards = shape_rewards(scores, kl, mask, self.kl_ctl.value)
            if ppo.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
            if ppo.whiten_advantages:
                advantages = masked_whiten(advantages, mask)

        with timer("train"), self._training():
            train_stats = self.train_on(batch, old_logprobs, old_values, advantages, returns, timer, is_weights)
        batch.update(scores=raw_scores, rewards=rewards, advantages=advantages, returns=returns)  # for rollout dumps

        seq_kl = kl.sum(1).mean().item()
        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(seq_kl, len(items))
        non_score = (-kl_coef * kl).sum(1)
        return {
            "objective/rlhf_reward": (scores + non_score).mean().item(),
            "objective/scores": raw_scores.mean().item(),
            **{f"objective/{k}": v.mean().item() for k, v in score_parts.items()},
            "objective/kl": seq_kl,
            "objective/non_score_reward": non_score.mean().item(),
            "objective/entropy": masked_mean(entropy, mask).item(),
            "objective/kl_coef": kl_coef,
            **train_stats,
            **mismatch,
            "val/mean_return": masked_mean(returns, mask).item(),
            "response_length": batch["response_lengths"].float().mean().item(),
            "eos_fraction": batch["finished"].float().mean().item(),
        }

    @torch.no_grad()
    def values(self, batch) -> torch.Tensor:
        """Critic values [N, T]: V(s_t) read from the hidden state of token t-1, masked."""
        t = batch["tokens"].shape[1]
        v = self._forward_rows(self.critic.model, self.ctx["critic"], batch, lambda out, mb: shift(out[..., 0].float()[:, :-1]), (t,))
        return v * batch["mask"]

    def transform_scores(self, scores: torch.Tensor, batch) -> torch.Tensor:
        """Missing-EOS and DAPO's overlong penalties, optional running normalisation and clipping."""
        ppo = self.cfg.ppo
        scores = self.length_penalties(scores, batch, ppo)
        if ppo.normalize_reward:
            self.moments.update(scores)
            scores = normalize_scores(scores, self.moments.mean, self.moments.std)
        return clip_scores(scores, ppo.reward_clip or None)

    # --- train ---------------------------------------------------------------------------
    def actor_loss(self, output, mb, n, n_ptx=None):
        """The policy objective (ppo.policy_loss, weighted by the rollout correction's
        importance weights when on) (+ entropy bonus) on a rollout microbatch, or ptx_coef x the
        SFT loss on a ptx microbatch. Both report the same stat keys (zeros for the other
        kind), as Megatron's schedule collects one dict per microbatch."""
        ppo = self.cfg.ppo
        logprobs, entropy = self._token_logprobs(output, mb["tokens"], self.ctx["actor"])
        zero = torch.zeros((), device=output.device)
        if "ptx_mask" in mb:
            loss, stats = sft_loss(logprobs, mb["ptx_mask"], n_ptx)
            keys = ("policy/pg_loss", "policy/clipfrac", "policy/approxkl", "policy/ratio", "policy/entropy")
            return ppo.ptx_coef * loss, {**dict.fromkeys(keys, zero), **stats}
        loss, stats = POLICY_OBJECTIVES[ppo.policy_loss](
            logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"], n,
            weights=mb.get("is_weights"), **ppo.objective_knobs,
        )  # fmt: skip
        ent_loss, ent_stats = entropy_loss(entropy, mb["mask"], n)
        if ppo.entropy_coef:
            loss = loss + ppo.entropy_coef * ent_loss
        # The rollout's entropy is objective/entropy; this one is the training pass's.
        stats["policy/entropy"] = ent_stats["objective/entropy"]
        if self.ptx_data is not None:
            stats["ptx/loss"] = zero
        return loss, stats

    def critic_loss(self, output, mb, n):
        values = shift(output[..., 0].float()[:, :-1])
        loss, stats = value_loss(values, mb["old_values"], mb["returns"], mb["mask"], self.cfg.ppo.cliprange_value, n)
        return self.cfg.ppo.vf_coef * loss, stats

    def train_on(self, batch, old_logprobs, old_values, advantages, returns, timer: PhaseTimer | None = None, is_weights=None) -> dict[str, float]:
        """ppo_epochs x minibatches: one actor and one critic optimizer step per minibatch.
        Minibatches are cut from one permutation per epoch, the same on every rank."""
        cfg, ppo = self.cfg, self.cfg.ppo
        timer = timer or PhaseTimer()
        n, size = batch["tokens"].shape[0], cfg.mini_batch_size
        sums: dict[str, float] = {}
        actor_extra = {"old_logprobs": old_logprobs, "advantages": advantages}
        if is_weights is not None:
            actor_extra["is_weights"] = is_weights

        def add(role: str, stats: dict[str, float]) -> None:
            for key, v in stats.items():
                name = key if "/" in key else f"{role}/{key}"
                sums[name] = sums.get(name, 0.0) + v

        for epoch in range(ppo.num_ppo_epochs):
            for minibatch in self.minibatches(n, size, ppo.num_mini_batches, epoch):
                num_tokens = batch["mask"][minibatch].sum().clamp(min=1).to(self.device)

                with timer("train/actor"):
                    actor_mbs, n_ptx = self.actor_microbatches(batch, minibatch, actor_extra)
                    add("actor", self.actor.train_step(actor_mbs, partial(self.actor_loss, n=num_tokens, n_ptx=n_ptx)))

                with timer("train/critic"):
                    critic = self.ctx["critic"]
                    mine = [minibatch[i] for i in shard_rows(size, critic)]
                    critic_mbs = self._microbatches(batch, mine, {"old_values": old_values, "returns": returns}, critic)
                    add("critic", self.critic.train_step(critic_mbs, partial(self.critic_loss, n=num_tokens)))
        steps = ppo.num_ppo_epochs * ppo.num_mini_batches
        return {k: v / steps for k, v in sums.items()}

    def actor_microbatches(self, batch, minibatch: list[int], extra) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]:
        """This actor DP rank's rollout microbatches of `minibatch`, followed by its ptx
        microbatches when ppo.ptx_coef is set; and the ptx batch's global token count."""
        groups = self.ctx["actor"]
        mine = [minibatch[i] for i in shard_rows(len(minibatch), groups)]
        if self.ptx_data is None:
            return self._microbatches(batch, mine, extra, groups), None
        items = [self.ptx_data[i] for i in self.ptx_sampler.next_batch()]
        step_t = None
        if groups.layout.pp > 1:  # one shape for every microbatch of the step
            longest = max(int(batch["lengths"][minibatch].max()), *(len(it["input_ids"]) for it in items))
            multiple = self._length_multiple(groups)
            step_t = -(-longest // multiple) * multiple
        ptx_mbs, n_ptx = ptx_microbatches(
            items, groups, micro_batch_size=self.cfg.train.micro_batch_size, pad_id=self.tokenizer.pad_id,
            device=self.device, length=step_t,
        )  # fmt: skip
        return self._microbatches(batch, mine, extra, groups, min_length=step_t or 0) + ptx_mbs, n_ptx
