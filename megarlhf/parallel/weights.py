"""Full (unsharded) <-> local (TP/PP-sharded) parameters of a GPTModel.

Layer: parallel/. A "full" state maps global parameter names (layer indices counted over
the whole model) to unsharded tensors, exactly what a TP1/PP1 model holds. Sharding
follows the attributes Megatron-Core puts on every tensor-parallel parameter
(`tensor_model_parallel`, `partition_dim`, `partition_stride`), so it is right for the
fused QKV (query groups are contiguous) and for SwiGLU's fc1 (stride 2: [gate_r; up_r]).

Used by the parallel equivalence tests, weight refit between layouts, and conversion.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from megarlhf.parallel.layout import RoleGroups

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")

# With tied embeddings and PP > 1 the last stage holds a copy of the word embeddings
# under the output layer's name (Megatron keeps the two in sync over the embedding group).
_TIED_ALIAS = {"output_layer.weight": "embedding.word_embeddings.weight"}


def _layer_offset(model, groups: RoleGroups) -> int:
    return groups.pp_rank * model.config.num_layers // groups.layout.pp


def global_name(local_name: str, offset: int) -> str:
    """'decoder.layers.1.mlp...' on a stage starting at layer 4 -> 'decoder.layers.5.mlp...'."""
    m = _LAYER.match(local_name)
    if m is None:
        return local_name
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"


def _is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def shard_tensor(full: torch.Tensor, dim: int, stride: int, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's shard: split into tp*stride chunks, take chunks rank, rank+tp, ..."""
    chunks = full.chunk(tp * stride, dim=dim)
    return torch.cat(chunks[rank::tp], dim=dim)


def unshard_tensor(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of `shard_tensor` given every rank's shard in TP-rank order."""
    if stride == 1:
        return torch.cat(shards, dim=dim)
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(len(shards))], dim=dim)


def local_parameters(model, groups: RoleGroups) -> dict[str, tuple[str, torch.nn.Parameter]]:
    """{global name: (local name, parameter)} for this rank's stage of `model`."""
    offset = _layer_offset(model, groups)
    return {global_name(n, offset): (n, p) for n, p in model.named_parameters()}


@torch.no_grad()
def load_full_state(model, full: dict[str, torch.Tensor], groups: RoleGroups) -> None:
    """Copy the matching slice of every full tensor into this rank's parameters."""
    tp, rank = groups.layout.tp, groups.tp_rank
    for name, (local_name, param) in local_parameters(model, groups).items():
        if name not in full and _TIED_ALIAS.get(name) in full:
            name = _TIED_ALIAS[name]
        if name not in full:
            raise KeyError(f"full state has no tensor {name!r} (local parameter {local_name!r})")
        src = full[name]
        if _is_tp_sharded(param) and tp > 1:
            src = shard_tensor(src, param.partition_dim, getattr(param, "partition_stride", 1), tp, rank)
        if src.shape != param.shape:
            raise ValueError(
                f"{name}: full tensor gives shape {tuple(src.shape)} on tp rank {rank}, "
                f"the parameter has {tuple(param.shape)}"
            )
        param.copy_(src)


@torch.no_grad()
def gather_full_state(
    model, groups: RoleGroups, *, grads: bool = False, values: dict[torch.nn.Parameter, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The full state (or full gradients, from `main_grad` or `.grad`) on every rank.

    `values`: gather these per-parameter tensors (shaped like their parameter) instead,
    e.g. the optimizer's float32 main weights of a bf16 model.

    Collective over the role's TP and PP groups. Meant for tests, refit and export of
    small-to-medium models: it materialises the whole model on each rank.
    """
    tp = groups.layout.tp
    stage: dict[str, torch.Tensor] = {}
    for name, (_, param) in local_parameters(model, groups).items():
        value = param if values is None else values[param]
        if grads:
            value = getattr(param, "main_grad", None)
            if value is None:
                value = param.grad if param.grad is not None else torch.zeros_like(param)
        value = value.detach()
        if _is_tp_sharded(param) and tp > 1:
            shards = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(shards, value.contiguous(), group=groups.tp)
            value = unshard_tensor(shards, param.partition_dim, getattr(param, "partition_stride", 1))
        stage[name] = value.clone()
    if groups.layout.pp == 1:
        return stage
    stages: list[dict[str, torch.Tensor] | None] = [None] * groups.layout.pp
    dist.all_gather_object(stages, stage, group=groups.pp)
    full: dict[str, torch.Tensor] = {}
    for part in stages:
        for name, value in part.items():
            full.setdefault(name, value)
    for alias, name in _TIED_ALIAS.items():
        if alias in full and name in full and getattr(model, "share_embeddings_and_output_weights", False):
            del full[alias]  # the last stage's copy of the tied embedding
    return full
