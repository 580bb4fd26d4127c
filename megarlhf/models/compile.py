"""torch.compile of model forwards: how megarlhf compiles (train.compile, generation.compile).

Layer: models/. One place for the settings every compiled forward needs, used by the
training engine (trained models), the trainers (frozen models that score) and the rollout
engine (its prefill and decode step).
"""

from __future__ import annotations

import torch
import torch._functorch.config as functorch_config

from megarlhf.config import ConfigError
from megarlhf.parallel import cpu_compat
from megarlhf.parallel.layout import RoleGroups


def torch_compile(fn, **kwargs):
    """`torch.compile(fn, **kwargs)`, after teaching dynamo the CPU layer's stand-ins.

    Four compiler settings change (dynamo, then AOTAutograd), for the process:
    (1) duck sizing is off (by default two dimensions that happen to be equal in the first
        call, a 32 x 32 microbatch, become one symbol, and the model recompiles when a
        later microbatch has rows != length);
    (2) the per-function recompile limit rises from 8 to 64: every model instance and grad
        mode is one more compiled entry of the same `GPTModel.forward` (PPO alone has six:
        actor and critic training and scoring, reference, reward model), and past the
        limit dynamo runs the function eagerly, silently;
    (3) float attributes are constants (`specialize_float`): under `dynamic=True` dynamo
        first traces a module's float attributes (dropout p, norm eps) as symbols, then
        specializes them and restarts the whole frame, so every GPTModel entry was traced
        and AOT-compiled twice;
    (4) graphs holding custom autograd.Functions may use AOTAutograd's on-disk cache:
        Megatron's linear layers and tensor-parallel mappings are such Functions, so by
        default every training graph bypasses that cache and each new process re-traces
        and re-partitions it. PyTorch checked that the traced Function (a higher-order op
        whose forward and backward bodies are part of the cached graph) is pure in its
        inputs; it keeps the switch off by default only while it rolls it out.
    (3) and (4) together, PPO on the examples' tiny models with a warm cache: the first
    iteration 63 -> 30 s, peak resident memory 611 -> 540 MiB.
    Also, inside compiled code only, Megatron's TransformerBlock skips `make_viewless_tensor`
    on its input: torch >= 2.14 traces that input as a view and breaks the graph on the
    function's `torch.empty(..., requires_grad=True)` (every forward split in two); what it
    guards against, an eager view keeping its base buffer alive, does not outlive a graph."""
    cpu_compat.teach_torch_compile()
    _viewless_only_when_eager()
    try:
        import torch.fx.experimental._config as fx_config

        fx_config.use_duck_shape = False
    except (ImportError, AttributeError):  # an older torch: duck sizing stays on (more recompiles, same results)
        pass
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # older torch's name
    setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    if hasattr(dynamo, "specialize_float"):  # older torch specializes floats anyway
        dynamo.specialize_float = True
    if hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):  # absent in older torch
        functorch_config.autograd_cache_allow_custom_autograd_functions = True
    return torch.compile(fn, **kwargs)


def _viewless_only_when_eager() -> None:
    from megatron.core.transformer import transformer_block

    eager = transformer_block.make_viewless_tensor
    if getattr(eager, "_megarlhf_compile", False):
        return

    def make_viewless_tensor(inp, requires_grad, keep_graph):
        if torch.compiler.is_compiling():
            return inp
        return eager(inp, requires_grad, keep_graph)

    make_viewless_tensor._megarlhf_compile = True
    transformer_block.make_viewless_tensor = make_viewless_tensor


def compile_model(model: torch.nn.Module, groups: RoleGroups, what: str) -> torch.nn.Module:
    """`model` (a GPTModel) through torch.compile with dynamic shapes, for `run_microbatches(
    forward=...)`: train.compile's path for trained and frozen models alike. Pipeline
    stages (p2p tensors between microbatches) and activation recompute (a forward replayed
    inside backward) stay eager: a config error, not a silent fallback."""
    if groups.layout.pp > 1 or model.config.recompute_granularity is not None:
        raise ConfigError(
            f"train.compile needs pipeline-parallel size 1 and no activation recompute; {what} has "
            f"layout {groups.layout}, recompute {model.config.recompute_granularity!r}: "
            "set train.compile=false (or give it a layout with pp=1)"
        )
    return torch_compile(model, dynamic=True)
