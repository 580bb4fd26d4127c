"""models.compile.torch_compile: the process-wide dynamo settings it promises."""

from __future__ import annotations

import torch

from megarlhf.models.compile import torch_compile


def test_square_first_batch_does_not_tie_rows_to_length():
    """A first call whose two dimensions happen to be equal (a 4 x 4 microbatch) must not
    make them one symbol: later 4 x 6 and 3 x 5 microbatches reuse the same graph. With
    dynamo's default duck sizing the second call would recompile."""
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def rowwise_logsumexp(x):
        return torch.logsumexp(x * 2.0, dim=-1)

    compiled = torch_compile(rowwise_logsumexp, backend=count_graphs, dynamic=True)
    for shape in ((4, 4), (4, 6), (3, 5)):
        x = torch.randn(*shape)
        torch.testing.assert_close(compiled(x), rowwise_logsumexp(x))
    assert len(graphs) == 1
    assert torch._dynamo.config.recompile_limit >= 64


def test_float_attributes_do_not_restart_the_frame():
    """A module's float attributes (dropout p, norm eps) under dynamic=True: dynamo's
    default traces them as symbols, then specializes them and restarts the frame, so the
    backend compiles it twice. After torch_compile's settings: once."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.0), torch.nn.RMSNorm(8, eps=1e-5))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch_compile(model, backend=counter, dynamic=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1


class _Scale(torch.autograd.Function):
    """A custom autograd.Function, as Megatron's linear layers and TP mappings are."""

    @staticmethod
    def forward(ctx, x):
        return x * 3.0

    @staticmethod
    def backward(ctx, grad):
        return grad * 3.0


def test_training_graph_with_custom_autograd_function_uses_aot_cache(tmp_path, monkeypatch):
    """A training graph holding a custom autograd.Function: compiled again after a reset
    (a new process, as far as the caches know), it must come from AOTAutograd's on-disk
    cache. torch's default bypasses that cache for such graphs (re-trace, re-partition
    on every process start)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def loss(w, x):
        return torch.tanh(_Scale.apply(x @ w)).sum()

    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(2, 4)
    expected = torch.autograd.grad(loss(w, x), w)[0]
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch_compile(loss, dynamic=True)
        torch.testing.assert_close(torch.autograd.grad(compiled(w, x), w)[0], expected)
    assert counters["aot_autograd"]["autograd_cache_hit"] == 1, dict(counters["aot_autograd"])
