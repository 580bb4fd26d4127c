"""The one owner of Megatron-Core's loss-function contract. Layer: engine/.

Megatron's pipeline schedules rescale whatever `loss_func` returns, and *how* depends on
the number of values it returns: a 2-tuple is divided by `num_microbatches` (and DDP then
averages over data-parallel ranks); a 3-tuple `(loss, num_tokens, stats)` is divided by
`num_tokens` unless `config.calculate_per_token_loss` is set. Either way the objective
silently changes with micro-batching and DP size when a loss divides by a *local* count.

megarlhf's rule (STYLE.md #2): every loss is `sum / N` where N is the *global* count
(tokens or sequences, all-reduced over DP before the micro-batch loop), so the gradient
summed over micro-batches and DP ranks is already the gradient of the global objective.
This module makes Megatron add, never divide:
- `calculate_per_token_loss=True` on the model config (set in `wrap_ddp`): the schedule
  does not divide by num_microbatches and DDP *sums* gradients across DP;
- `loss_func` returns a 3-tuple with num_tokens = 1 (never used for scaling, since we
  call `finalize_model_grads(num_tokens=None)` ourselves).
`tests/parallel/test_engine_equivalence.py` checks that 1x8 == 8x1 == DP2 == TP2 == PP2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.utils import get_model_config

from megarlhf.parallel import compat, cpu_compat
from megarlhf.parallel.layout import RoleGroups

Batch = dict[str, torch.Tensor]
# loss_fn(model_output [B, T, ...], microbatch) -> (globally normalised scalar loss, stats)
LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, Any]]]

_ONE = torch.tensor(1, dtype=torch.int)
LOSS_KEY = "_loss"
"""The stats key under which `run_microbatches` (training only) returns each
microbatch's loss as given to backward: the engine checks it is finite."""


def wrap_ddp(
    model: torch.nn.Module,
    groups: RoleGroups,
    *,
    use_distributed_optimizer: bool = False,
    grad_reduce_in_fp32: bool = True,
):
    """Megatron DDP around a trainable model: contiguous grad buffers (float32 unless
    `grad_reduce_in_fp32=False`, whatever the parameters' dtype), DP reduction."""
    config = get_model_config(model)
    config.calculate_per_token_loss = True  # see module docstring: Megatron adds, we normalise
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=False,
    )
    ddp = DistributedDataParallel(config, ddp_config, model, pg_collection=groups.pgc)
    ddp.broadcast_params()
    return ddp


def run_microbatches(
    model: torch.nn.Module,
    groups: RoleGroups,
    microbatches: Sequence[Batch],
    loss_fn: LossFn,
    *,
    forward_only: bool = False,
    forward: Callable[..., torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Forward (+ backward) over `microbatches` with Megatron's schedule for this layout.

    Each microbatch needs "tokens" and "position_ids" ([B, T]; under PP equal shapes across
    microbatches, since pipeline stages exchange fixed-size activations; without PP each
    microbatch may have its own length). On the last pipeline
    stage returns each microbatch's stats dict; on other stages an empty list.
    Gradients (unless forward_only) are accumulated into the DDP grad buffers and, after
    the last microbatch, reduced across DP (and TP for sequence-parallel norms, and the
    first/last stage for tied embeddings). `forward`: what the microbatches go through
    instead of `model` (the compiled model of `TrainEngine(compile=True)`).
    """
    # A Megatron inference engine may have left its process-wide flag set (0.18+); under
    # it the forward takes inference-only paths and a training forward fails.
    compat.leave_inference_mode()
    config = get_model_config(model)
    micro_batch_size, seq_length = microbatches[0]["tokens"].shape
    if groups.layout.pp > 1:  # stages exchange activations of one fixed shape
        for i, mb in enumerate(microbatches):
            if mb["tokens"].shape != (micro_batch_size, seq_length):
                raise ValueError(
                    f"microbatch {i} has tokens {tuple(mb['tokens'].shape)}, microbatch 0 has "
                    f"{(micro_batch_size, seq_length)}: under pipeline parallelism pad every "
                    f"microbatch to one shape"
                )

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        with cpu_compat.fast_path():
            output = (model if forward is None else forward)(batch["tokens"], batch["position_ids"], None)

        def loss_func(output_tensor):
            with cpu_compat.fast_path():
                loss, stats = loss_fn(output_tensor, batch)
            if not forward_only:
                stats = {**stats, LOSS_KEY: loss.detach()}
            return loss, _ONE, stats

        return output, loss_func

    forward_backward = get_forward_backward_func(pp_size=groups.layout.pp)
    stats = forward_backward(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        p2p_communicator=P2PCommunicator(pp_group=groups.pp, config=config),
        pg_collection=groups.pgc,
    )
    if not forward_only:
        finalize_model_grads([model], num_tokens=None, pg_collection=groups.pgc)
    return list(stats) if groups.is_last_stage else []


def zero_grads(model: torch.nn.Module) -> None:
    """Clear DDP grad buffers (or plain .grad) before a new accumulation."""
    if isinstance(model, DistributedDataParallel):
        model.zero_grad_buffer()
    else:
        model.zero_grad(set_to_none=True)
