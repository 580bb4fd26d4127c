"""A trainable role on Megatron-Core: DDP model + optimizer + LR scheduler.

Layer: engine/. `TrainEngine.train_step(microbatches, loss_fn)` is one optimizer step:
zero the grad buffers, forward/backward every microbatch through Megatron's pipeline
schedule (loss contract: see schedule.py), reduce grads over DP, clip, step, advance the
LR schedule. `forward(...)` is the same schedule without grads (scoring, evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megarlhf.config import OptimConfig
from megarlhf.engine.schedule import Batch, LossFn, run_microbatches, wrap_ddp
from megarlhf.models.compile import compile_model
from megarlhf.parallel.layout import RoleGroups


def reduce_stats(per_microbatch: list[dict[str, Any]], groups: RoleGroups) -> dict[str, float]:
    """Sum 0-d tensor stats over microbatches and DP ranks; every rank gets the result.

    Stats are *sums* (e.g. loss * n, correct counts, n) so that summing is right at any
    micro-batching and DP size; the caller divides. They exist on the last pipeline
    stage only, so they are broadcast along the pipeline afterwards. Collective over the
    role's DP and PP groups.
    """
    totals: dict[str, float] = {}
    if groups.is_last_stage and per_microbatch:
        keys = sorted(k for k, v in per_microbatch[0].items() if torch.is_tensor(v) and v.dim() == 0)
        if keys:
            summed = torch.stack([torch.stack([mb[k].detach().double() for k in keys]).cpu() for mb in per_microbatch]).sum(0)
            if torch.cuda.is_available():
                summed = summed.cuda()
            dist.all_reduce(summed, group=groups.dp)
            totals = dict(zip(keys, summed.tolist()))
    if groups.layout.pp > 1:
        box = [totals]
        src = dist.get_global_rank(groups.pp, groups.layout.pp - 1)
        dist.broadcast_object_list(box, src=src, group=groups.pp)
        totals = box[0]
    return totals


class TrainEngine:
    """The model, optimizer and scheduler of one trainable role at one layout."""

    def __init__(
        self, model: torch.nn.Module, groups: RoleGroups, optim: OptimConfig, max_steps: int, *, compile: bool = False
    ):
        # torch.compile of the GPTModel itself (DDP's forward only calls it; DDP's
        # gradient hooks sit on the parameters, which stay leaves of the compiled graph).
        self.compiled_model = compile_model(model, groups, "the trained model") if compile else None
        self.groups = groups
        self.model = wrap_ddp(
            model,
            groups,
            use_distributed_optimizer=optim.use_distributed_optimizer,
            grad_reduce_in_fp32=optim.grad_reduce_in_fp32,
        )
        params_dtype = model.config.params_dtype
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.learning_rate,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_epsilon,
                clip_grad=optim.max_grad_norm,
                params_dtype=params_dtype,
                bf16=params_dtype == torch.bfloat16,
                fp16=params_dtype == torch.float16,
                use_distributed_optimizer=optim.use_distributed_optimizer,
            ),
            [self.model],
            use_gloo_process_groups=False,
            pg_collection=groups.pgc,
        )
        decay_steps = max(1, max_steps - optim.warmup_steps) + optim.warmup_steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if optim.warmup_steps else optim.learning_rate,
            max_lr=optim.learning_rate,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=decay_steps,
            lr_decay_style=optim.lr_scheduler_type,
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
        )

    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped GPTModel (this rank's shard/stage)."""
        return self.model.module

    def train_step(self, microbatches: Sequence[Batch], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over `microbatches` (this DP rank's share of a global batch).

        Returns the summed stats (see `reduce_stats`) plus grad_norm, lr and whether the
        update was applied (False only for an fp16 overflow).
        """
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        per_mb = run_microbatches(self.model, self.groups, microbatches, loss_fn, forward=self.compiled_model)
        # Advance the schedule first: update k (1-based) uses lr(k), so warm-up's first
        # update is lr/warmup_steps rather than a wasted step at lr = 0.
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        self._fused_cpu_adam()
        applied, grad_norm, _ = self.optimizer.step()
        stats = reduce_stats(per_mb, self.groups)
        stats["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        stats["learning_rate"] = lr
        stats["update_applied"] = float(bool(applied))
        return stats

    def _fused_cpu_adam(self) -> None:
        """CPU only: without TE/Apex, Megatron's optimizer is torch's AdamW, which on CPU
        runs a Python loop over tensors; torch's fused CPU kernel does the same update in
        one call per group (optimizer step 5.9 -> 3.2 ms on the examples' 0.6M model).
        Set before every step, since loading a checkpoint restores the saved flags."""
        if torch.cuda.is_available():
            return
        for chained in getattr(self.optimizer, "chained_optimizers", None) or [self.optimizer]:
            inner = getattr(chained, "optimizer", None)
            if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
                for group in inner.param_groups:
                    group["fused"], group["foreach"] = True, False

    def offload(self) -> None:
        """GPU: optimizer states and gradient buffers to CPU (between training phases)."""
        self.optimizer.offload_to_cpu()
        self.model.offload_grad_buffers()

    def onload(self) -> None:
        """Undo `offload` before the next train_step."""
        self.model.restore_grad_buffers()
        self.optimizer.restore_from_cpu()

    @torch.no_grad()
    def forward(self, microbatches: Sequence[Batch], loss_fn: LossFn) -> dict[str, float]:
        """Forward-only pass (eval mode); summed stats on every rank."""
        self.model.eval()
        per_mb = run_microbatches(
            self.model, self.groups, microbatches, loss_fn, forward_only=True, forward=self.compiled_model
        )
        return reduce_stats(per_mb, self.groups)
