"""What every online RL stage shares (PPO, GRPO): roles, rollouts, scoring, the loop.
Layer: trainers/.

A `RolloutTrainer` owns the actor (trainable, at `layout`), the frozen reference and
reward models (each at its own layout), the rollout engine on the actor's weights, the
prompts, and the loop `fit()`: iterations of generate -> `update()` -> refit, with
evaluation, checkpoints and metrics; the reward side of scoring (reward model, rule,
length penalties) is trainers/scoring.py's `RewardScoring`. A subclass says what an update is (`update`), which
other trainable roles it has (`extra_layouts`, `_build_models`, `trainables`) and what
else its checkpoints hold (`state_dict`, `load_state_dict`).

Per-sample results travel between layouts as whole-batch tensors replicated on every rank
(parallel/collect.py), so the math in between is plain, replicated torch: identical on
every rank and at every layout.

Alignment: per-token tensors are [N, T] with index t holding the quantity of token t (its
log-prob given tokens < t, the value of the state before it); `mask` is 1 on response
tokens.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from megarlhf.algorithms import mismatch_metrics, rollout_is_weights
from megarlhf.checkpoint.dist_ckpt import (
    CheckpointError,
    checkpoint_model_config,
    load_checkpoint,
    load_model_weights,
    resume_checkpoint,
    save_checkpoint,
)
from megarlhf.config import ConfigError, ModelConfig, RolloutConfig
from megarlhf.data import PromptDataset, ShardedSampler
from megarlhf.data.template import tokenizer_and_template
from megarlhf.engine.engine import TrainEngine
from megarlhf.engine.schedule import run_microbatches
from megarlhf.models.backbone import build_model
from megarlhf.models.compile import compile_model
from megarlhf.models.logprobs import logprobs_and_entropy
from megarlhf.parallel import Layout, RoleGroups, build_parallel_context, init_distributed, seed_all
from megarlhf.parallel.collect import gather_rows, is_row_owner, shard_rows
from megarlhf.parallel.refit import WeightRefit
from megarlhf.rollout import GenerationEngine, SamplingParams
from megarlhf.rollout.rewards import load_reward_fn
from megarlhf.trainers.dumps import dump_path, replay, write_rollouts
from megarlhf.trainers.ppo_batches import cut_microbatches, rollout_batch
from megarlhf.trainers.guard import NonFiniteGuard, warn_if_disk_short
from megarlhf.trainers.preempt import StopRequest
from megarlhf.trainers.run import RunDir
from megarlhf.trainers.scoring import RewardScoring


def shift(x: torch.Tensor) -> torch.Tensor:
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


class RolloutTrainer(RewardScoring):
    stage = ""
    postfix_keys: tuple[str, ...] = ("objective/scores", "objective/kl")
    shown_keys: tuple[str, ...] = ()
    plot_keys: tuple[str, ...] = ("objective/scores", "objective/kl", "eval/score")

    def __init__(self, cfg: RolloutConfig, resume: str | None = None):
        self.stop = StopRequest()  # first: a SIGUSR1/SIGTERM during set-up is kept too
        self.cfg = cfg
        init_distributed()
        a = cfg.layout
        layouts = {"actor": Layout(a.tp, a.pp), **self.extra_layouts()}
        if self.uses_reference:
            layouts["reference"] = Layout(*cfg.reference_layout.resolve(a))
        layouts["rollout"] = Layout(cfg.generation.tp or a.tp, 1)
        if cfg.reward_model_path:
            layouts["reward"] = Layout(*cfg.reward_layout.resolve(a))
        self.ctx = build_parallel_context(layouts)
        seed_all(cfg.train.seed, self.ctx["actor"])

        self.tokenizer, self.template = tokenizer_and_template(cfg.data)
        self.vocab_size = self.tokenizer.vocab_size
        self._load_data()
        self.row_multiple = self._check_batch_sizes()
        self.reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
        # Each model's forward through torch.compile under train.compile (trained and frozen).
        self.compiled: dict[torch.nn.Module, torch.nn.Module] = {}
        self._build_models()
        for engine in self.trainables().values():
            if engine.compiled_model is not None:
                self.compiled[engine.model] = engine.compiled_model

        self.step = 0
        self.guard = NonFiniteGuard(cfg.train.max_skipped_steps, cfg.train.run_dir)
        resume_from = resume_checkpoint(resume, cfg.train.run_dir)
        self.run = RunDir(cfg.train.run_dir, cfg, is_main=self.ctx.is_main, resume=resume_from is not None)
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.trainables())
            self.step = state["step"]
            self.sampler.load_state_dict(state["sampler"])
            self.load_state_dict(state)
            self.run.truncate_metrics(self.step)
            self.run.say(f"resumed from {resume_from} at iteration {self.step}")
        self.refit.refit()
        if (cfg.offload_optimizer or cfg.offload_frozen) and not torch.cuda.is_available():
            self.run.say("offload_optimizer / offload_frozen ignored: no CUDA device")
        self.offload_optimizer = cfg.offload_optimizer and torch.cuda.is_available()
        self.offload_frozen = cfg.offload_frozen and torch.cuda.is_available()
        for model in self.frozen_models():
            self._place(model, on_device=not self.offload_frozen)
        self._offload_trainables()

    # --- what a subclass says ----------------------------------------------------------------
    uses_reference = True
    """Whether the stage needs the frozen reference policy."""

    def extra_layouts(self) -> dict[str, Layout]:
        """Layouts of trainable roles besides the actor (PPO: the critic)."""
        return {}

    def trainables(self) -> dict[str, TrainEngine]:
        return {"actor": self.actor}

    def state_dict(self) -> dict[str, Any]:
        """What checkpoints hold besides the trainable roles, the step and the sampler."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @property
    def rollout_rows(self) -> int:
        """Sequences generated per iteration."""
        return self.cfg.rollout_rows

    @property
    def passes(self) -> int:
        """How often each rollout is trained on (PPO epochs, GRPO iterations)."""
        return 1

    def rollout_items(self, items: list[dict]) -> list[dict]:
        """Prompts of an iteration -> one item per sequence to generate."""
        return items

    def update(self, batch: dict[str, torch.Tensor], items: list[dict], timer: PhaseTimer | None = None) -> dict[str, float]:
        raise NotImplementedError

    # --- set-up -------------------------------------------------------------------------
    def _load_data(self) -> None:
        cfg = self.cfg
        if cfg.data.truncation == "right":
            raise ConfigError("data.truncation = right would cut a prompt's assistant marker: use error or drop")
        load = partial(
            PromptDataset, tokenizer=self.tokenizer, template=self.template, max_length=cfg.data.max_length,
            truncation=cfg.data.truncation, on_error=cfg.data.on_error, columns=cfg.data.columns(),
        )  # fmt: skip
        self.prompts = load(cfg.data.train_file, progress=self.ctx.is_main)
        self.eval_prompts = load(cfg.data.eval_file) if cfg.data.eval_file else None
        # Every rank draws the same global batch (dp=1 here): the rollout batch is
        # replicated, and each role cuts out its own data-parallel share.
        self.sampler = ShardedSampler(len(self.prompts), cfg.train.global_batch_size, 0, 1, seed=cfg.train.seed)

    def _check_batch_sizes(self) -> int:
        """The rollout batch and minibatches split over every role's DP ranks (the
        config's check, also run by `megarlhf launch`). Returns the row multiple."""
        return self.cfg.check_batch_split({r: g.layout.dp for r, g in self.ctx.roles.items()})

    def _frozen(self, model_cfg: ModelConfig, role: str, head: str, path: str, saved_role: str):
        groups = self.ctx[role]
        model = build_model(model_cfg, groups, head)
        load_model_weights(model, groups, path, saved_role)
        model.requires_grad_(False)
        if self.cfg.train.compile:
            self.compiled[model] = compile_model(model, groups, f"the {role} model")
        return model.eval()

    def _build_models(self) -> None:
        """Actor, reference, reward model and the rollout engine."""
        cfg, ctx = self.cfg, self.ctx
        self._check_vocab(cfg.model, "model")
        actor = build_model(cfg.model, ctx["actor"], "lm")
        load_model_weights(actor, ctx["actor"], cfg.sft_model_path, "actor")
        self.actor = TrainEngine(actor, ctx["actor"], cfg.optim, cfg.optimizer_steps, compile=cfg.train.compile)
        self.reference = None
        if self.uses_reference:
            self.reference = self._frozen(cfg.model, "reference", "lm", cfg.sft_model_path, "actor")
        self.reward = None
        if cfg.reward_model_path:
            # Shape from the checkpoint, numerics from this run: a float32 reward model
            # scores in bf16 in a bf16 run (its weights are cast on load).
            rm_cfg = replace(checkpoint_model_config(cfg.reward_model_path), params_dtype=cfg.model.params_dtype)
            self._check_vocab(rm_cfg, f"the reward model ({cfg.reward_model_path})")
            self.reward = self._frozen(rm_cfg, "reward", "value", cfg.reward_model_path, "reward")

        # The rollout engine reads the actor's parameters in place when the layouts agree
        # (a TP-only actor); otherwise it owns a TP-only copy that refit keeps current.
        same = ctx["rollout"] is ctx["actor"]
        engine_model = self.actor.module if same else build_model(cfg.model, ctx["rollout"], "lm")
        self.refit = WeightRefit(self.actor.module, ctx["actor"], engine_model, ctx["rollout"])
        self.generator = GenerationEngine(
            engine_model, ctx["rollout"], vocab_size=self.vocab_size,
            eos_id=self.tokenizer.eos_ids, pad_id=self.tokenizer.pad_id,
            cuda_graphs=cfg.generation.cuda_graphs, compile=cfg.generation.compile,
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

    def _offload_trainables(self) -> None:
        if self.offload_optimizer:
            for engine in self.trainables().values():
                engine.offload()

    def _onload_trainables(self) -> None:
        if self.offload_optimizer:
            for engine in self.trainables().values():
                engine.onload()

    @contextmanager
    def _training(self):
        """Optimizer states on the device only while training (offload_optimizer)."""
        self._onload_trainables()
        try:
            yield
        finally:
            self._offload_trainables()

    def _check_vocab(self, model_cfg: ModelConfig, what: str) -> None:
        if self.vocab_size > model_cfg.vocab_size:
            raise ConfigError(
                f"{what} has vocab_size {model_cfg.vocab_size}, smaller than the tokenizer's "
                f"{self.vocab_size} ({self.cfg.data.tokenizer})"
            )

    # --- one iteration -----------------------------------------------------------------------
    def iteration(self) -> dict[str, float]:
        """Generate on the next batch of prompts, then `update`, then refit the engine."""
        cfg = self.cfg
        timer = PhaseTimer()
        t_start = time.perf_counter()
        items = self.rollout_items([{**self.prompts[i], "index": i} for i in self.sampler.next_batch()])
        sampling = SamplingParams(
            max_new_tokens=cfg.generation.response_length, temperature=cfg.generation.temperature,
            top_k=cfg.generation.top_k, top_p=cfg.generation.top_p,
        )  # fmt: skip
        with timer("generate"):
            batch = self.generate(items, sampling, self.step)
        metrics = self.update(batch, items, timer)
        every = cfg.train.dump_rollouts
        if every and (self.step + 1) % every == 0 and self.ctx.is_main:
            with timer("dump"):
                write_rollouts(dump_path(cfg.train.run_dir, self.step + 1), batch, items, self.tokenizer.decode, self.step)
        with timer("refit"):
            self.refit.refit()
        seconds = time.perf_counter() - t_start
        generated = float(batch["mask"].sum())
        # Non-pad tokens trained on: every sequence, once per pass.
        trained = float(batch["lengths"].sum()) * self.passes
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

    # --- generate ------------------------------------------------------------------------
    def generate(self, items: list[dict], sampling: SamplingParams, salt: int) -> dict[str, torch.Tensor]:
        """One response per item, generated by the rollout engine's DP ranks and gathered
        on every rank. Sample i uses seed (seed, salt, i): independent of layout."""
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
            tokens = F.pad(out.tokens, (0, pad), value=self.tokenizer.pad_id)
            columns = (tokens, *(F.pad(c, (0, pad)) for c in (out.response_mask, out.logprobs, out.entropies)))
            local = torch.stack([c.double() for c in columns], dim=-1)
        both = gather_rows(local, rows, (n, full_t, 4), owner=is_row_owner(groups), dtype=torch.float64, device=self.device).cpu()
        batch = self.rollout_batch(both[..., 0].long(), both[..., 1].float(), items)
        t = batch["tokens"].shape[1]
        # The sampling policy's own log-probs and entropies (see generation.old_logprobs).
        batch["engine_logprobs"] = F.pad(both[..., 2].float(), (0, max(0, t - full_t)))[:, :t] * batch["mask"]
        batch["engine_entropy"] = F.pad(both[..., 3].float(), (0, max(0, t - full_t)))[:, :t] * batch["mask"]
        return batch

    def sampling_logprobs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies) [N, T] of the rollouts under the policy that sampled them:
        the engine's (generation.old_logprobs = 'engine') or one more actor forward pass."""
        if self.cfg.generation.old_logprobs == "engine":
            return batch["engine_logprobs"], batch["engine_entropy"]
        return self.policy_logprobs(self.actor.model, self.ctx["actor"], batch)

    def measure_mismatch(self, batch, old_logprobs: torch.Tensor | None, timer: PhaseTimer):
        """The engine-vs-trainer gap on the sampled tokens -> (old log-probs, importance
        weights [N, T] or None, rollout_correction/* metrics).

        Needs the trainer's log-probs at the pre-update weights: the old ones when they were
        recomputed, else one more actor forward pass (time/score/mismatch). Computed over
        the whole replicated batch, so the same at every layout. With a correction on, the
        ratio's old log-probs become the trainer's (decoupled PPO, as TRL and verl do): the
        engine's then enter only through the weight."""
        rc = self.cfg.rollout_correction
        if not rc.measure or "engine_logprobs" not in batch:
            if rc.mode != "none":
                raise ConfigError(f"rollout_correction.mode = {rc.mode} needs rollouts with the engine's log-probs")
            return old_logprobs, None, {}
        with timer("score/mismatch"):
            trainer_logprobs = old_logprobs
            if old_logprobs is None or self.cfg.generation.old_logprobs == "engine":
                trainer_logprobs = self.policy_logprobs(self.actor.model, self.ctx["actor"], batch)[0]
        engine_logprobs, mask = batch["engine_logprobs"], batch["mask"]
        stats = mismatch_metrics(trainer_logprobs, engine_logprobs, mask)
        weights, weight_stats = rollout_is_weights(
            trainer_logprobs, engine_logprobs, mask, rc.mode, rc.cap, rc.mask_low, rc.mask_high
        )
        batch["trainer_logprobs"], batch["is_weights"] = trainer_logprobs, weights  # for rollout dumps
        stats = {k: float(v) for k, v in {**stats, **weight_stats}.items()}
        if rc.mode == "none":
            return old_logprobs, None, stats
        return (trainer_logprobs if old_logprobs is not None else None), weights, stats

    def rollout_batch(self, tokens: torch.Tensor, mask: torch.Tensor, items: list[dict]) -> dict[str, torch.Tensor]:
        """tokens [N, T] (prompt, response, pad) + response mask -> the batch the update
        works on, with enough columns for every role's rounded microbatch length."""
        return rollout_batch(
            tokens, mask, torch.tensor([len(it["prompt_ids"]) for it in items]),
            eos_id=self.tokenizer.eos_ids, pad_id=self.tokenizer.pad_id,
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
        mbs = self._microbatches(batch, list(rows), {}, groups, forward_only=True)
        model.eval()
        zero = torch.zeros((), device=self.device)
        outs = run_microbatches(
            model, groups, mbs, lambda out, mb: (zero, {"rows": per_token(out, mb)}), forward_only=True,
            forward=self.compiled.get(model),
        )  # fmt: skip
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
        return shift(lp), shift(ent)

    @torch.no_grad()
    def policy_logprobs(self, model, groups: RoleGroups, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies) [N, T] of the batch's tokens under `model`, masked."""
        t = batch["tokens"].shape[1]

        def per_token(out, mb):
            return torch.stack(self._token_logprobs(out, mb["tokens"], groups), dim=-1)

        both = self._forward_rows(model, groups, batch, per_token, (t, 2))
        return both[..., 0] * batch["mask"], both[..., 1] * batch["mask"]

    def score_group_size(self) -> int:
        """Consecutive rows that share a prompt (GRPO: num_generations)."""
        return 1

    # --- train ---------------------------------------------------------------------------
    def _length_multiple(self, groups: RoleGroups) -> int:
        return groups.length_multiple(self.cfg.model.sequence_parallel)

    def _microbatches(
        self, batch, rows: list[int], extra, groups: RoleGroups, min_length: int = 0, forward_only: bool = False
    ):
        """This DP rank's `rows` at `groups`' layout -> microbatches (ppo_batches.cut_microbatches)
        of micro_batch_size rows, or `RunConfig.forward_micro_batch` rows for forward-only passes."""
        size = self.cfg.train.micro_batch_size
        if forward_only:
            size = self.cfg.train.forward_micro_batch(len(rows), pipelined=groups.layout.pp > 1)
        return cut_microbatches(
            batch, rows, extra, micro_batch_size=size, pipelined=groups.layout.pp > 1,
            multiple=self._length_multiple(groups), pad_id=self.tokenizer.pad_id, device=self.device,
            min_length=min_length,
        )  # fmt: skip

    def minibatches(self, n: int, size: int, num: int, epoch: int) -> list[list[int]]:
        """`num` minibatches of `size` rows cut from one permutation per epoch, the same on
        every rank (seeded by seed, iteration and epoch)."""
        g = torch.Generator().manual_seed(hash((self.cfg.train.seed, self.step, epoch)) % 2**62)
        perm = torch.randperm(n, generator=g)
        return [perm[k * size : (k + 1) * size].tolist() for k in range(num)]

    # --- evaluation, checkpoints, the loop -----------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean score of one response to each held-out prompt (sampled with fixed seeds, so
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
        self._onload_trainables()  # checkpoints are written from the device
        try:
            path = save_checkpoint(
                self.cfg.train.run_dir,
                self.step,
                self.trainables(),
                {"stage": self.stage, "sampler": self.sampler.state_dict(), **self.state_dict()},
                keep=self.cfg.train.save_total_limit,
            )
        except CheckpointError as err:
            if self.cfg.train.on_save_error != "continue":
                raise
            self.run.say(f"iteration {self.step}: checkpoint not saved, training continues (train.on_save_error=continue): {err}")
            path = None
        self._offload_trainables()
        if path is not None:
            self.run.say(f"saved checkpoint {path}")

    def describe(self) -> str:
        """The first log line: sizes and layouts."""
        layouts = ", ".join(f"{r} {g.layout}" for r, g in self.ctx.roles.items())
        models = {**{r: e.model for r, e in self.trainables().items()}, "reference": self.reference, "reward": self.reward}
        compiled = [r for r, m in models.items() if m is not None and m in self.compiled]
        compiled += ["decode step"] if self.generator.compile else []
        return (
            f"megarlhf {self.stage}: {self.cfg.model.num_parameters('lm') / 1e6:.2f}M-parameter policy, "
            f"{len(self.prompts)} prompts ({self.prompts.skip_summary()}), "
            f"{self.cfg.train.global_batch_size} prompts per iteration; "
            f"{layouts}; refit {self.refit}" + (f"; torch.compile: {', '.join(compiled)}" if compiled else "")
        )

    def replay(self, path: str) -> dict[str, Any]:
        """One update on a dumped rollout batch, without generating (trainers.dumps.replay)."""
        return replay(self, path)

    def fit(self) -> dict[str, Any]:
        cfg, run = self.cfg.train, self.run
        run.say(self.describe())
        if (done := run.finished_summary(self.step, cfg.max_steps)) is not None:
            run.close()
            return done
        warn_if_disk_short(cfg.run_dir, self.trainables(), run)
        eval_before: dict[str, float] = {}
        if self.step == 0:
            eval_before = self.evaluate()
            if eval_before:
                run.log_metrics(0, eval_before)
                run.say(f"before {self.stage.upper()}: " + ", ".join(f"{k} {v:.4g}" for k, v in eval_before.items()))
        bar = run.progress(cfg.max_steps, self.step, desc=self.stage)
        metrics: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        while self.step < cfg.max_steps:
            metrics = self.iteration()
            self.step += 1
            self.guard.after_step(self.step, self.trainables(), run)
            if cfg.eval_steps and self.step % cfg.eval_steps == 0 or self.step == cfg.max_steps:
                last_eval = self.evaluate()
                metrics.update(last_eval)
            run.log_metrics(self.step, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in self.postfix_keys if k in metrics})
            if self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                run.say(f"iteration {self.step}: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in self.shown_keys if k in metrics))
            stop = self.stop.agreed(self.device) and self.step < cfg.max_steps  # a last step just finishes
            if stop or cfg.save_steps and self.step % cfg.save_steps == 0 or self.step == cfg.max_steps:
                self.save()
            if stop:
                return self.stop.stopped(run, self.stage, self.step)
        summary = {"stage": self.stage, "steps": self.step, "final": metrics, "eval_before": eval_before, "eval": last_eval}
        run.write_summary(summary)
        run.plot(f"plots/{self.stage}.png", list(self.plot_keys), title=self.stage.upper())
        run.close()
        return summary
