"""The loop shared by the supervised stages (SFT, reward model). Layer: trainers/.

A subclass says what a sample is (`load_dataset`, `collate`), what the model outputs
(`head`) and what the objective is (`loss`, `metrics`); this class does the rest:
data-parallel sampling, global loss denominators, optimizer steps through the
TrainEngine, evaluation, checkpoints and resume, metrics and progress.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megarlhf.checkpoint.dist_ckpt import (
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    resolve_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    save_model_weights,
)
from megarlhf.checkpoint.hf import copy_hf_metadata, load_hf_weights
from megarlhf.config import ConfigError, SFTConfig
from megarlhf.data import ShardedSampler
from megarlhf.data.template import tokenizer_and_template
from megarlhf.engine.engine import TrainEngine
from megarlhf.models.backbone import build_model
from megarlhf.parallel import Layout, build_parallel_context, init_distributed, seed_all
from megarlhf.parallel.layout import RoleGroups
from megarlhf.trainers.guard import NonFiniteGuard, warn_if_disk_short
from megarlhf.trainers.preempt import StopRequest
from megarlhf.trainers.run import RunDir


class SupervisedTrainer:
    role: str = "actor"
    """Name of the model in checkpoints ('actor' for SFT, 'reward' for the RM)."""
    head: str = "lm"
    """'lm' (policy) or 'value' (scalar per token)."""
    stage: str = "sft"

    def __init__(self, cfg: SFTConfig, resume: str | None = None):
        self.stop = StopRequest()  # first: a SIGUSR1/SIGTERM during set-up is kept too
        self.cfg = cfg
        init_distributed()
        self.ctx = build_parallel_context(self.layouts())
        self.groups = self.ctx[self.role]
        seed_all(cfg.train.seed, self.groups)
        self.dp, self.dp_rank = self.groups.layout.dp, self.groups.dp_rank
        self.num_microbatches = cfg.train.num_microbatches(self.dp)

        self.tokenizer, self.template = tokenizer_and_template(cfg.data)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} ({cfg.data.tokenizer}): raise model.vocab_size"
            )
        self.train_data = self.load_dataset(cfg.data.train_file, progress=self.ctx.is_main)
        self.eval_data = self.load_dataset(cfg.data.eval_file, progress=False) if cfg.data.eval_file else None
        self.sampler = ShardedSampler(
            len(self.train_data), cfg.train.global_batch_size, self.dp_rank, self.dp, seed=cfg.train.seed
        )

        model = build_model(cfg.model, self.groups, self.head)
        if cfg.init_from:
            self._init_weights(model, cfg.init_from)
        self.engine = TrainEngine(model, self.groups, cfg.optim, cfg.train.max_steps, compile=cfg.train.compile)
        self.device = next(model.parameters()).device

        self.step = 0
        self.guard = NonFiniteGuard(cfg.train.max_skipped_steps, cfg.train.run_dir)
        resume_from = resume_checkpoint(resume, cfg.train.run_dir)
        self.run = RunDir(cfg.train.run_dir, cfg, is_main=self.ctx.is_main, resume=resume_from is not None)
        if resume_from is not None:
            state = load_checkpoint(resume_from, {self.role: self.engine})
            self.step = state["step"]
            self.sampler.load_state_dict(state["sampler"])
            self.run.truncate_metrics(self.step)
            self.run.say(f"resumed from {resume_from} at step {self.step}")

    # --- what subclasses define -------------------------------------------------------
    def layouts(self) -> dict[str, Layout]:
        """Every model's layout ({role: Layout}); the trained one's is `layout`."""
        return {self.role: Layout(self.cfg.layout.tp, self.cfg.layout.pp)}

    def load_dataset(self, path: str, progress: bool):
        raise NotImplementedError

    def collate(self, items: list[dict], seq_length: int) -> dict[str, torch.Tensor]:
        """Items -> one microbatch padded to seq_length (tokens, position_ids, row_weight, ...)."""
        raise NotImplementedError

    def sample_length(self, item: dict) -> int:
        """Tokens one row of this item needs."""
        raise NotImplementedError

    def step_length(self, items: list[dict], groups: RoleGroups | None = None) -> int:
        """Pad `items` to their longest sample, not to data.max_length; rounded up to
        `RoleGroups.length_multiple` of `groups` (default: the trained model's; 8 on GPU,
        x tp under sequence parallelism, else 1)."""
        multiple = (groups or self.groups).length_multiple(self.cfg.model.sequence_parallel)
        longest = max(self.sample_length(it) for it in items)
        return min(self.cfg.data.max_length, -(-longest // multiple) * multiple) if longest else multiple

    def count(self, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss denominator contributed by one microbatch (tokens or sequences)."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, mb: dict[str, torch.Tensor], n: torch.Tensor):
        """(sum over this microbatch / n, stats of sums) — see engine/schedule.py."""
        raise NotImplementedError

    def metrics(self, sums: dict[str, float], prefix: str = "") -> dict[str, float]:
        raise NotImplementedError

    def compiled_roles(self) -> list[str]:
        """The models whose forward runs through torch.compile (train.compile)."""
        return [self.role] if self.engine.compiled_model is not None else []

    # --- the loop ---------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg.train
        run = self.run
        if (done := run.finished_summary(self.step, cfg.max_steps)) is not None:
            run.close()
            return done
        run.say(
            f"megarlhf {self.stage}: {self.cfg.model.num_parameters(self.head) / 1e6:.2f}M parameters, "
            f"layout {self.groups.layout}, {len(self.train_data)} training samples "
            f"({self.train_data.skip_summary()})"
            + ("" if self.eval_data is None else
               f", {len(self.eval_data)} eval samples ({self.eval_data.skip_summary()})")
            + f", global batch {cfg.global_batch_size} = "
            f"{cfg.micro_batch_size} x {self.num_microbatches} microbatches x {self.dp} dp"
            + (f"; torch.compile: {', '.join(compiled)}" if (compiled := self.compiled_roles()) else "")
        )
        warn_if_disk_short(cfg.run_dir, {self.role: self.engine}, run)
        bar = run.progress(cfg.max_steps, self.step, desc=self.stage)
        metrics: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            microbatches = self.next_microbatches()
            n, tokens, computed = self.global_counts(microbatches)
            sums = self.engine.train_step(microbatches, partial(self.loss, n=n))
            self.step += 1
            self.guard.after_step(self.step, {self.role: self.engine}, run)
            elapsed = time.perf_counter() - t0
            metrics = self.metrics(sums)
            metrics.update(
                grad_norm=sums["grad_norm"],
                learning_rate=sums["learning_rate"],
                epoch=self._epoch(),
                tokens_per_second=tokens / elapsed,
                step_seconds=elapsed,
                seq_length=max(mb["tokens"].shape[1] for mb in microbatches),
                computed_tokens=computed,
            )
            if cfg.eval_steps and self.step % cfg.eval_steps == 0 or self.step == cfg.max_steps:
                last_eval = self.evaluate()
                metrics.update(last_eval)
            run.log_metrics(self.step, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in self.postfix_keys})
            if self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                run.say(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            stop = self.stop.agreed(self.device) and self.step < cfg.max_steps  # a last step just finishes
            if stop or cfg.save_steps and self.step % cfg.save_steps == 0 or self.step == cfg.max_steps:
                self.save()
            if stop:
                return self.stop.stopped(run, self.stage, self.step)
        summary = {"stage": self.stage, "steps": self.step, "final": metrics, "eval": last_eval}
        run.write_summary(summary)
        run.close()
        return summary

    postfix_keys = ("loss",)

    def _epoch(self) -> float:
        """Fractional epochs of training data consumed (TRL's `epoch`)."""
        s = self.sampler
        return s.epoch + s.consumed_in_epoch / (s.batches_per_epoch * s.global_batch_size)

    def next_microbatches(self) -> list[dict[str, torch.Tensor]]:
        """This DP rank's slice of the next global batch, split into microbatches (each
        with "sample_index": the dataset indices of its samples, named when a step is
        skipped as non-finite)."""
        picked = [(i, self.train_data[i]) for i in self.sampler.next_batch()]
        mbs = self.cfg.train.micro_batch_size

        def cut(chunk, length):
            mb = self.collate([item for _, item in chunk], length)
            mb["sample_index"] = torch.tensor([i for i, _ in chunk])
            return mb

        if self.groups.layout.pp > 1:
            # Pipeline stages exchange fixed-size activations: one length for the step
            # (every stage sees the same data, so they agree on it).
            length = self.step_length([item for _, item in picked])
            return [cut(picked[k : k + mbs], length) for k in range(0, len(picked), mbs)]
        # Otherwise each microbatch is cut to its own longest sample, samples grouped by
        # length (longest first). Losses are sums over the global count (engine/schedule.py),
        # so the grouping does not change the gradient, only the padding computed.
        picked.sort(key=lambda p: self.sample_length(p[1]), reverse=True)
        chunks = [picked[k : k + mbs] for k in range(0, len(picked), mbs)]
        return [cut(chunk, self.step_length([item for _, item in chunk])) for chunk in chunks]

    def global_counts(self, microbatches) -> tuple[torch.Tensor, float, float]:
        """(loss denominator, non-pad tokens, computed positions incl. padding) summed
        over microbatches and DP ranks.

        All-reduced *before* the microbatch loop, so every microbatch's loss is
        sum / N_global and the accumulated gradient is that of the global mean.
        """
        local = torch.stack(
            [
                torch.stack([self.count(mb) for mb in microbatches]).sum(),
                torch.stack([mb["attention_tokens"] for mb in microbatches]).sum(),
                torch.tensor(float(sum(mb["tokens"].numel() for mb in microbatches))),
            ]
        ).double().to(self.device)
        dist.all_reduce(local, group=self.groups.dp)
        n = local[0].clamp(min=1).float()
        return n, local[1].item(), local[2].item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Forward-only pass over the whole eval set; metrics prefixed 'eval_'."""
        if self.eval_data is None:
            return {}
        total = len(self.eval_data)
        mbs = self.cfg.train.forward_micro_batch(total, pipelined=False)  # one microbatch per schedule call
        sums: dict[str, float] = {}
        chunk = mbs * self.dp
        for start in range(0, total, chunk):
            # Every rank runs the same number of microbatches; rows past the end repeat
            # the last sample with row_weight 0.
            lo = start + self.dp_rank * mbs
            idx = [min(i, total - 1) for i in range(lo, lo + mbs)]
            items = [self.eval_data[i] for i in idx]
            mb = self.collate(items, self.step_length(items))
            mb["row_weight"] = (torch.arange(lo, lo + mbs) < total).to(mb["row_weight"].dtype).to(self.device)
            n, _, _ = self.global_counts([mb])
            for k, v in self.engine.forward([mb], partial(self.loss, n=n)).items():
                sums[k] = sums.get(k, 0.0) + v
        return self.metrics(sums, prefix="eval_")

    def save(self) -> None:
        try:
            path = save_checkpoint(
                self.cfg.train.run_dir,
                self.step,
                {self.role: self.engine},
                {"sampler": self.sampler.state_dict(), "stage": self.stage},
                keep=self.cfg.train.save_total_limit,
            )
        except CheckpointError as err:
            if self.cfg.train.on_save_error != "continue":
                raise
            self.run.say(f"step {self.step}: checkpoint not saved, training continues (train.on_save_error=continue): {err}")
            return
        self.run.say(f"saved checkpoint {path}")


    def _init_weights(self, model: torch.nn.Module, path: str) -> None:
        if path.startswith("hf:"):
            # Converted on the fly: every rank streams its own TP/PP slice out of the HF
            # safetensors (a rank-0-only conversion could not write a dist checkpoint, whose
            # save is collective). Kept as run_dir/hf_init for export and later stages.
            src, out = Path(path[3:]), Path(self.cfg.train.run_dir) / "hf_init"
            load_hf_weights(model, self.groups, src, progress=self.ctx.is_main)
            save_model_weights(model, self.groups, out, self.role, source=path)
            if self.ctx.is_main:
                copy_hf_metadata(src, out / "hf")
            return
        ckpt = resolve_checkpoint(path)
        if (ckpt / self.role).is_dir():
            load_model_weights(model, self.groups, ckpt, self.role)
        else:
            # A reward model starting from an SFT policy: everything but the LM head,
            # which the value head replaces.
            load_model_weights(model, self.groups, ckpt, "actor", exclude=("output_layer.",))
