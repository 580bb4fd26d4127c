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
