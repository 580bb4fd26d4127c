"""PPO with four roles: actor, critic, reference, reward. Layer: trainers/.

`PPOTrainer.iteration()` is the algorithm, top to bottom (Ouyang et al. 2022):

    generate   the actor's weights, in the rollout engine, sample one response per prompt
    score      reward (model and/or rule), reference log-probs, actor log-probs, values
    shape      r_t = -beta * KL_t on every response token, + the score on the last one
    GAE        advantages and returns (gamma, lambda); whiten the advantages
    train      ppo_epochs x minibatches: clipped policy loss (+ entropy bonus) for the
               actor, clipped value loss for the critic, one optimizer step each
    adapt      the KL controller moves beta towards its target
    refit      the rollout engine gets the new actor weights

Each role lives at its own TP/PP layout on the same ranks. Per-sample results travel
between layouts as whole-batch tensors replicated on every rank (parallel/collect.py), so
the math in between (shaping, GAE, whitening, minibatch cuts) is plain, replicated torch:
identical on every rank and identical at every layout.

Alignment: per-token tensors are [N, T] with index t holding the quantity of token t (its
log-prob given tokens < t, the value of the state before it); `mask` is 1 on response
tokens. Losses are sums over tokens divided by the minibatch's (global) token count.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megarlhf.algorithms import (
    RunningMoments,
    clip_scores,
    gae,
    kl_penalty,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    normalize_scores,
    policy_loss,
    entropy_loss,
    sft_loss,
    shape_rewards,
    value_loss,
)
from megarlhf.checkpoint.dist_ckpt import (
    checkpoint_model_config,
    load_checkpoint,
    load_model_weights,
    resolve_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from megarlhf.config import ConfigError, ModelConfig, PPOConfig
from megarlhf.data import ChatTemplate, PromptDataset, SFTDataset, ShardedSampler, load_tokenizer
from megarlhf.engine.engine import TrainEngine
from megarlhf.engine.schedule import run_microbatches
from megarlhf.models.backbone import build_model
from megarlhf.models.logprobs import logprobs_and_entropy
from megarlhf.parallel import Layout, RoleGroups, build_parallel_context, init_distributed, seed_all
from megarlhf.parallel.collect import gather_rows, is_row_owner, shard_rows
from megarlhf.parallel.refit import WeightRefit
from megarlhf.rollout import GenerationEngine, SamplingParams
from megarlhf.rollout.rewards import load_reward_fn
from megarlhf.trainers.ppo_batches import cut_microbatches, length_multiple, ptx_microbatches, rollout_batch
from megarlhf.trainers.rm import sequence_scores
from megarlhf.trainers.run import RunDir


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Output at position t-1 -> the quantity of token t: [B, T-1] -> [B, T], 0 at t = 0."""
    return F.pad(x, (1, 0))


class PhaseTimer:
    """Wall time per named phase of one iteration."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


class PPOTrainer:
    stage = "ppo"

    def __init__(self, cfg: PPOConfig, resume: str | None = None):
        self.cfg = cfg
        init_distributed()
        a = cfg.layout
        layouts = {
            "actor": Layout(a.tp, a.pp),
            "critic": Layout(*cfg.critic_layout.resolve(a)),
            "reference": Layout(*cfg.reference_layout.resolve(a)),
            "rollout": Layout(cfg.generation.tp or a.tp, 1),
        }
        if cfg.reward_model_path:
            layouts["reward"] = Layout(*cfg.reward_layout.resolve(a))
        self.ctx = build_parallel_context(layouts)
        seed_all(cfg.train.seed, self.ctx["actor"])

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self.template = ChatTemplate()
        if cfg.data.truncation == "right":
            raise ConfigError("data.truncation = right would cut a prompt's assistant marker: use error or drop")
        load = partial(
            PromptDataset, tokenizer=self.tokenizer, template=self.template, max_length=cfg.data.max_length,
            truncation=cfg.data.truncation, on_error=cfg.data.on_error,
        )  # fmt: skip
        self.prompts = load(cfg.data.train_file, progress=self.ctx.is_main)
        self.eval_prompts = load(cfg.data.eval_file) if cfg.data.eval_file else None
        # Every rank draws the same global batch (dp=1 here): the rollout batch is
        # replicated, and each role cuts out its own data-parallel share.
        self.sampler = ShardedSampler(len(self.prompts), cfg.train.global_batch_size, 0, 1, seed=cfg.train.seed)
        self.ptx_data = self.ptx_sampler = None
        if cfg.ptx_rows:
            self.ptx_data = SFTDataset(
                cfg.ptx_file, self.tokenizer, self.template, max_length=cfg.model.max_seq_length,
                truncation="error", on_error=cfg.data.on_error, progress=self.ctx.is_main,
            )  # fmt: skip
            self.ptx_sampler = ShardedSampler(len(self.ptx_data), cfg.ptx_rows, 0, 1, seed=cfg.train.seed + 1)
        self.row_multiple = self._check_batch_sizes()

        self.reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
        self._build_models()
        self.kl_ctl = make_kl_controller(cfg.ppo.kl_coef, cfg.ppo.adap_kl_ctrl, cfg.ppo.target, cfg.ppo.horizon)
        self.moments = RunningMoments()

        self.step = 0
        resume_from = resume_checkpoint(resume, cfg.train.run_dir)
        self.run = RunDir(cfg.train.run_dir, cfg, is_main=self.ctx.is_main, resume=resume_from is not None)
        if resume_from is not None:
            state = load_checkpoint(resume_from, {"actor": self.actor, "critic": self.critic})
            self.step = state["step"]
            self.sampler.load_state_dict(state["sampler"])
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.moments.load_state_dict(state["moments"])
            if self.ptx_sampler is not None:
                self.ptx_sampler.load_state_dict(state["ptx_sampler"])
            self.run.truncate_metrics(self.step)
            self.run.say(f"resumed from {resume_from} at iteration {self.step}")
        self.refit.refit()
        if (cfg.offload_optimizer or cfg.offload_frozen) and not torch.cuda.is_available():
            self.run.say("offload_optimizer / offload_frozen ignored: no CUDA device")
        self.offload_optimizer = cfg.offload_optimizer and torch.cuda.is_available()
        self.offload_frozen = cfg.offload_frozen and torch.cuda.is_available()
        for model in self.frozen_models():
            self._place(model, on_device=not self.offload_frozen)
        if self.offload_optimizer:
            self.actor.offload()
            self.critic.offload()

    # --- set-up -------------------------------------------------------------------------
    def _check_batch_sizes(self) -> int:
        """Every role must split the rollout batch, and the actor/critic each minibatch,
        into whole microbatches on each of its DP ranks. Returns the row multiple."""
        cfg, mbs = self.cfg, self.cfg.train.micro_batch_size
        needs = {r: mbs * g.layout.dp for r, g in self.ctx.roles.items() if r != "rollout"}
        needs["rollout"] = self.ctx["rollout"].layout.dp
        if cfg.ptx_rows % needs["actor"]:
            raise ConfigError(
                f"ptx_batch_size = {cfg.ptx_rows} does not split over the actor's "
                f"{self.ctx['actor'].layout.dp} data-parallel ranks x micro_batch_size {mbs}: "
                f"make it a multiple of {needs['actor']}"
            )
        for role, need in needs.items():
            size = cfg.mini_batch_size if role in ("actor", "critic") else cfg.train.global_batch_size
            what = "the minibatch (global_batch_size / ppo.num_mini_batches)" if role in ("actor", "critic") else "train.global_batch_size"
            if size % need:
                raise ConfigError(
                    f"{what} = {size} does not split over the {role}'s {self.ctx[role].layout.dp} "
                    f"data-parallel ranks x micro_batch_size {mbs}: make it a multiple of {need}"
                )
        return math.lcm(*needs.values())

    def _frozen(self, model_cfg: ModelConfig, role: str, head: str, path: str, saved_role: str):
        groups = self.ctx[role]
        model = build_model(model_cfg, groups, head)
        load_model_weights(model, groups, path, saved_role)
        model.requires_grad_(False)
        return model.eval()

    def _build_models(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        self._check_vocab(cfg.model, "model")
        actor = build_model(cfg.model, ctx["actor"], "lm")
        load_model_weights(actor, ctx["actor"], cfg.sft_model_path, "actor")
        self.actor = TrainEngine(actor, ctx["actor"], cfg.optim, cfg.optimizer_steps)
        self.reference = self._frozen(cfg.model, "reference", "lm", cfg.sft_model_path, "actor")
        self.reward = None
        if cfg.reward_model_path:
            rm_cfg = checkpoint_model_config(cfg.reward_model_path)
            self._check_vocab(rm_cfg, f"the reward model ({cfg.reward_model_path})")
            self.reward = self._frozen(rm_cfg, "reward", "value", cfg.reward_model_path, "reward")

        value_path = cfg.value_model_path or cfg.reward_model_path
        if value_path:
            critic_cfg = checkpoint_model_config(value_path)
            critic = build_model(critic_cfg, ctx["critic"], "value")
            saved = "critic" if (resolve_checkpoint(value_path) / "critic").is_dir() else "reward"
            load_model_weights(critic, ctx["critic"], value_path, saved)
        else:  # the SFT policy's body under a fresh value head
            critic = build_model(cfg.model, ctx["critic"], "value")
            load_model_weights(critic, ctx["critic"], cfg.sft_model_path, "actor", exclude=("output_layer.",))
        self.critic = TrainEngine(critic, ctx["critic"], cfg.critic_optim, cfg.optimizer_steps)

        # The rollout engine reads the actor's parameters in place when the layouts agree
        # (a TP-only actor); otherwise it owns a TP-only copy that refit keeps current.
        same = ctx["rollout"] is ctx["actor"]
        engine_model = self.actor.module if same else build_model(cfg.model, ctx["rollout"], "lm")
        self.refit = WeightRefit(self.actor.module, ctx["actor"], engine_model, ctx["rollout"])
        self.generator = GenerationEngine(
            engine_model, ctx["rollout"], vocab_size=self.vocab_size,
            eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
        )  # fmt: skip
        self.device = next(actor.parameters()).device

    def frozen_models(self) -> list[torch.nn.Module]:
        return [m for m in (self.reference, self.reward) if m is not None]

    def _place(self, model: torch.nn.Module, on_device: bool) -> None:
        """Frozen weights to the GPU (to score) or to CPU (otherwise) under offload_frozen."""
        model.to(self.device if on_device else "cpu")

    @contextmanager
    def _frozen_on_device(self):
        if self.offload_frozen:
            for model in self.frozen_models():
                self._place(model, on_device=True)
        try:
            yield
        finally:
            if self.offload_frozen:
                for model in self.frozen_models():
                    self._place(model, on_device=False)
                torch.cuda.empty_cache()

    def _check_vocab(self, model_cfg: ModelConfig, what: str) -> None:
        if self.vocab_size > model_cfg.vocab_size:
            raise ConfigError(
                f"{what} has vocab_size {model_cfg.vocab_size}, smaller than the tokenizer's "
                f"{self.vocab_size} ({self.cfg.data.tokenizer})"
            )


    # --- one PPO iteration ---------------------------------------------------------------
    def iteration(self) -> dict[str, float]:
        """Generate on the next batch of prompts, then `update`, then refit the engine."""
        cfg = self.cfg
        timer = PhaseTimer()
        t_start = time.perf_counter()
        items = [self.prompts[i] for i in self.sampler.next_batch()]
        sampling = SamplingParams(
            max_new_tokens=cfg.generation.response_length, temperature=cfg.generation.temperature,
            top_k=cfg.generation.top_k, top_p=cfg.generation.top_p,
        )  # fmt: skip
        with timer("generate"):
            batch = self.generate(items, sampling, self.step)
        metrics = self.update(batch, items, timer)
        with timer("refit"):
            self.refit.refit()
        seconds = time.perf_counter() - t_start
        generated = float(batch["mask"].sum())
        # Non-pad tokens trained on: every sequence, once per PPO epoch (actor and critic).
        trained = float(batch["lengths"].sum()) * cfg.ppo.num_ppo_epochs
        metrics.update({
            "tokens/generated": generated,
            "tokens/trained": trained,
            "throughput/generated_tokens_per_second": generated / timer.seconds["generate"],
            "throughput/tokens_per_second": (generated + trained) / seconds,
            "time/iteration": seconds,
            **{f"time/{k}": v for k, v in timer.seconds.items()},
            "time/refit_engine": self.refit.last_seconds,
        })  # fmt: skip
        return metrics

    def update(self, batch: dict[str, torch.Tensor], items: list[dict], timer: PhaseTimer | None = None) -> dict[str, float]:
        """Everything after generation: score, shape, GAE, PPO epochs, KL controller."""
        ppo = self.cfg.ppo
        timer = timer or PhaseTimer()
        mask = batch["mask"]
        with timer("score"), self._frozen_on_device():
            raw_scores, score_parts = self.score(batch, items)
            ref_logprobs, _ = self.policy_logprobs(self.reference, self.ctx["reference"], batch)
            old_logprobs, entropy = self.policy_logprobs(self.actor.model, self.ctx["actor"], batch)
            old_values = self.values(batch)

        with timer("advantages"):
            scores = self.transform_scores(raw_scores, batch)
            kl = torch.where(mask.bool(), kl_penalty(old_logprobs, ref_logprobs, ppo.kl_estimator), 0.0)
            rewards = shape_rewards(scores, kl, mask, self.kl_ctl.value)
            if ppo.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
            if ppo.whiten_advantages:
                advantages = masked_whiten(advantages, mask)

        with timer("train"):
            if self.offload_optimizer:
                self.actor.onload()
                self.critic.onload()
            train_stats = self.train_on(batch, old_logprobs, old_values, advantages, returns)
            if self.offload_optimizer:
                self.actor.offload()
                self.critic.offload()

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
            "val/mean_return": masked_mean(returns, mask).item(),
            "response_length": batch["response_lengths"].float().mean().item(),
            "eos_fraction": batch["finished"].float().mean().item(),
        }

    # --- generate ------------------------------------------------------------------------
    def generate(self, items: list[dict], sampling: SamplingParams, salt: int) -> dict[str, torch.Tensor]:
        """One response per prompt, generated by the rollout engine's DP ranks and
        gathered on every rank. Sample i uses seed (seed, salt, i): independent of layout."""
        n = len(items)
        groups = self.ctx["rollout"]
        rows = shard_rows(n, groups)
        prompts = [items[i]["prompt_ids"].tolist() for i in rows]
        seeds = [hash((self.cfg.train.seed, salt, i)) % 2**62 for i in rows]
        out = self.generator.generate(prompts, sampling, seeds)
        full_t = max(len(it["prompt_ids"]) for it in items) + sampling.max_new_tokens
        local = None
        if is_row_owner(groups):
            pad = full_t - out.tokens.shape[1]
            local = torch.cat(
                [
                    F.pad(out.tokens, (0, pad), value=self.tokenizer.pad_id).unsqueeze(-1).double(),
                    F.pad(out.response_mask, (0, pad)).unsqueeze(-1).double(),
                ],
                dim=-1,
            )
        both = gather_rows(local, rows, (n, full_t, 2), owner=is_row_owner(groups), dtype=torch.float64, device=self.device)
        return self.rollout_batch(both[..., 0].long().cpu(), both[..., 1].float().cpu(), items)

    def rollout_batch(self, tokens: torch.Tensor, mask: torch.Tensor, items: list[dict]) -> dict[str, torch.Tensor]:
        """tokens [N, T] (prompt, response, pad) + response mask -> the batch PPO works on,
        with enough columns for every role's rounded microbatch length."""
        return rollout_batch(
            tokens, mask, torch.tensor([len(it["prompt_ids"]) for it in items]),
            eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
            multiple=math.lcm(*(self._length_multiple(g) for g in self.ctx.roles.values())),
            max_seq_length=self.cfg.model.max_seq_length,
        )  # fmt: skip

    # --- score ---------------------------------------------------------------------------
    def _forward_rows(self, model, groups: RoleGroups, batch, per_token, trailing: tuple[int, ...]) -> torch.Tensor:
        """Forward-only pass of `model` over the whole batch at its layout; `per_token(output,
        microbatch)` -> [b, *trailing] rows (per-token outputs may be shorter than T: the
        microbatch's own length), gathered over the world in the batch's row order."""
        n, t = batch["tokens"].shape
        rows = shard_rows(n, groups)
        mbs = self._microbatches(batch, list(rows), {}, groups)
        model.eval()
        zero = torch.zeros((), device=self.device)
        outs = run_microbatches(model, groups, mbs, lambda out, mb: (zero, {"rows": per_token(out, mb)}), forward_only=True)
        owner = is_row_owner(groups)
        local = None
        if owner:
            local = torch.zeros((len(rows), *trailing), device=self.device)
            for mb, out in zip(mbs, outs):
                if trailing:
                    local[mb["slot"], : out["rows"].shape[1]] = out["rows"].float()
                else:
                    local[mb["slot"]] = out["rows"].float()
        return gather_rows(local, rows, (n, *trailing), owner=owner, device=self.device).cpu()

    def _token_logprobs(self, output: torch.Tensor, tokens: torch.Tensor, groups: RoleGroups):
        lp, ent = logprobs_and_entropy(
            output[:, :-1], tokens[:, 1:], tp_group=groups.tp, vocab_size=self.vocab_size,
            temperature=self.cfg.generation.temperature,
        )  # fmt: skip
        return _shift(lp), _shift(ent)

    @torch.no_grad()
    def policy_logprobs(self, model, groups: RoleGroups, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies) [N, T] of the batch's tokens under `model`, masked."""
        t = batch["tokens"].shape[1]

        def per_token(out, mb):
            return torch.stack(self._token_logprobs(out, mb["tokens"], groups), dim=-1)

        both = self._forward_rows(model, groups, batch, per_token, (t, 2))
        return both[..., 0] * batch["mask"], both[..., 1] * batch["mask"]

    @torch.no_grad()
    def values(self, batch) -> torch.Tensor:
        """Critic values [N, T]: V(s_t) read from the hidden state of token t-1, masked."""
        t = batch["tokens"].shape[1]
        v = self._forward_rows(self.critic.model, self.ctx["critic"], batch, lambda out, mb: _shift(out[..., 0].float()[:, :-1]), (t,))
        return v * batch["mask"]

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
        return total, parts

    def rule_scores(self, batch, items) -> torch.Tensor:
        """The rule reward, each sample scored once in the world (a rule may be costly or
        call a service): by the rollout DP rank that generated it, then gathered."""
        groups = self.ctx["rollout"]
        n = batch["tokens"].shape[0]
        rows = shard_rows(n, groups)
        owner = is_row_owner(groups)
        local = None
        if owner:
            texts, prompts, answers = [], [], []
            for i in rows:
                p, r = int(batch["prompt_lengths"][i]), int(batch["response_lengths"][i])
                ids = [t for t in batch["tokens"][i, p : p + r].tolist() if t != self.tokenizer.eos_id]
                texts.append(self.tokenizer.decode(ids))
                prompts.append(items[i]["prompt_text"])
                answers.append(items[i]["answer"])
            local = torch.tensor(self.reward_fn(prompts, texts, answers), dtype=torch.float64)
        return gather_rows(local, rows, (n,), owner=owner, dtype=torch.float64, device=self.device).float().cpu()

    def transform_scores(self, scores: torch.Tensor, batch) -> torch.Tensor:
        """Missing-EOS penalty, optional running normalisation and clipping."""
        ppo = self.cfg.ppo
        if ppo.missing_eos_penalty:
            scores = scores - ppo.missing_eos_penalty * (~batch["finished"]).float()
        if ppo.normalize_reward:
            self.moments.update(scores)
            scores = normalize_scores(scores, self.moments.mean, self.moments.std)
        return clip_scores(scores, ppo.reward_clip or None)

    # --- train ---------------------------------------------------------------------------
    def _length_multiple(self, groups: RoleGroups) -> int:
        return length_multiple(groups, self.cfg.model.sequence_parallel)

    def _microbatches(self, batch, rows: list[int], extra, groups: RoleGroups, min_length: int = 0):
        """This DP rank's `rows` at `groups`' layout -> microbatches (ppo_batches.cut_microbatches)."""
        return cut_microbatches(
            batch, rows, extra, micro_batch_size=self.cfg.train.micro_batch_size, pipelined=groups.layout.pp > 1,
            multiple=self._length_multiple(groups), pad_id=self.tokenizer.pad_id, device=self.device,
            min_length=min_length,
        )  # fmt: skip

    def actor_loss(self, output, mb, n, n_ptx=None):
        """Clipped policy loss (+ entropy bonus) on a rollout microbatch, or ptx_coef x the
        SFT loss on a ptx microbatch. Both report the same stat keys (zeros for the other
        kind), as Megatron's schedule collects one dict per microbatch."""
        ppo = self.cfg.ppo
        logprobs, entropy = self._token_logprobs(output, mb["tokens"], self.ctx["actor"])
        zero = torch.zeros((), device=output.device)
        if "ptx_mask" in mb:
            loss, stats = sft_loss(logprobs, mb["ptx_mask"], n_ptx)
            keys = ("policy/pg_loss", "policy/clipfrac", "policy/approxkl", "policy/ratio", "policy/entropy")
            return ppo.ptx_coef * loss, {**dict.fromkeys(keys, zero), **stats}
        loss, stats = policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"], ppo.cliprange, n)
        ent_loss, ent_stats = entropy_loss(entropy, mb["mask"], n)
        if ppo.entropy_coef:
            loss = loss + ppo.entropy_coef * ent_loss
        # The rollout's entropy is objective/entropy; this one is the training pass's.
        stats["policy/entropy"] = ent_stats["objective/entropy"]
        if self.ptx_data is not None:
            stats["ptx/loss"] = zero
        return loss, stats

    def critic_loss(self, output, mb, n):
        values = _shift(output[..., 0].float()[:, :-1])
        loss, stats = value_loss(values, mb["old_values"], mb["returns"], mb["mask"], self.cfg.ppo.cliprange_value, n)
        return self.cfg.ppo.vf_coef * loss, stats

    def train_on(self, batch, old_logprobs, old_values, advantages, returns) -> dict[str, float]:
        """ppo_epochs x minibatches: one actor and one critic optimizer step per minibatch.
        Minibatches are cut from one permutation per epoch, the same on every rank."""
        cfg, ppo = self.cfg, self.cfg.ppo
        n, size = batch["tokens"].shape[0], cfg.mini_batch_size
        sums: dict[str, float] = {}

        def add(role: str, stats: dict[str, float]) -> None:
            for key, v in stats.items():
                name = key if "/" in key else f"{role}/{key}"
                sums[name] = sums.get(name, 0.0) + v

        for epoch in range(ppo.num_ppo_epochs):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(hash((cfg.train.seed, self.step, epoch)) % 2**62))
            for k in range(ppo.num_mini_batches):
                minibatch = perm[k * size : (k + 1) * size].tolist()
                num_tokens = batch["mask"][minibatch].sum().clamp(min=1).to(self.device)

                actor_mbs, n_ptx = self.actor_microbatches(batch, minibatch, {"old_logprobs": old_logprobs, "advantages": advantages})
                add("actor", self.actor.train_step(actor_mbs, partial(self.actor_loss, n=num_tokens, n_ptx=n_ptx)))

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

    # --- evaluation, checkpoints, the loop -----------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean score of responses to the held-out prompts (sampled with fixed seeds, so
        evaluations at different iterations compare like with like)."""
        if self.eval_prompts is None:
            return {}
        gen = self.cfg.generation
        sampling = SamplingParams(
            max_new_tokens=gen.response_length,
            temperature=0.0 if self.cfg.eval_greedy else gen.temperature,
            top_k=gen.top_k, top_p=gen.top_p,
        )  # fmt: skip
        items = [self.eval_prompts[i] for i in range(len(self.eval_prompts))]
        real = len(items)
        items += [items[-1]] * (-real % self.row_multiple)  # whole microbatches everywhere
        batch = self.generate(items, sampling, salt=-1)
        with self._frozen_on_device():
            total, parts = self.score(batch, items)
        out = {"eval/score": total[:real].mean().item()}
        out.update({f"eval/{k}": v[:real].mean().item() for k, v in parts.items()})
        out["eval/response_length"] = batch["response_lengths"][:real].float().mean().item()
        return out

    def save(self) -> None:
        if self.offload_optimizer:  # checkpoints are written from the device
            self.actor.onload()
            self.critic.onload()
        path = save_checkpoint(
            self.cfg.train.run_dir,
            self.step,
            {"actor": self.actor, "critic": self.critic},
            {
                "stage": self.stage,
                "sampler": self.sampler.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(),
                "moments": self.moments.state_dict(),
                "ptx_sampler": self.ptx_sampler.state_dict() if self.ptx_sampler is not None else None,
            },
            keep=self.cfg.train.save_total_limit,
        )
        if self.offload_optimizer:
            self.actor.offload()
            self.critic.offload()
        self.run.say(f"saved checkpoint {path}")

    postfix_keys = ("objective/scores", "objective/kl")

    def fit(self) -> dict[str, Any]:
        cfg, run = self.cfg.train, self.run
        layouts = ", ".join(f"{r} {g.layout}" for r, g in self.ctx.roles.items())
        run.say(
            f"megarlhf ppo: {self.cfg.model.num_parameters('lm') / 1e6:.2f}M-parameter policy, "
            f"{len(self.prompts)} prompts, {cfg.global_batch_size} rollouts per iteration, "
            f"{self.cfg.ppo.num_ppo_epochs} epochs x {self.cfg.ppo.num_mini_batches} minibatches; {layouts}; "
            f"refit {self.refit}"
        )
        eval_before: dict[str, float] = {}
        if self.step == 0:
            eval_before = self.evaluate()
            if eval_before:
                run.log_metrics(0, eval_before)
                run.say("before PPO: " + ", ".join(f"{k} {v:.4g}" for k, v in eval_before.items()))
        bar = run.progress(cfg.max_steps, self.step, desc="ppo")
        metrics: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        while self.step < cfg.max_steps:
            metrics = self.iteration()
            self.step += 1
            if cfg.eval_steps and self.step % cfg.eval_steps == 0 or self.step == cfg.max_steps:
                last_eval = self.evaluate()
                metrics.update(last_eval)
            run.log_metrics(self.step, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in self.postfix_keys})
            if self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                shown = ("objective/scores", "objective/kl", "objective/kl_coef", "objective/entropy",
                         "policy/clipfrac", "val/vf_loss", "response_length", "time/iteration")  # fmt: skip
                run.say(f"iteration {self.step}: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics))
            if cfg.save_steps and self.step % cfg.save_steps == 0 or self.step == cfg.max_steps:
                self.save()
        summary = {"stage": self.stage, "steps": self.step, "final": metrics, "eval_before": eval_before, "eval": last_eval}
        run.write_summary(summary)
        run.plot("plots/ppo.png", ["objective/scores", "objective/kl", "eval/score"], title="PPO")
        run.close()
        return summary
