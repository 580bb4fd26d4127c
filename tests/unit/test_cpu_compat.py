"""The CPU platform layer on its own: device rewrites, type names, the RNG tracker."""

import pytest
import torch

from megarlhf.parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is only installed without CUDA")


@pytest.fixture(scope="module", autouse=True)
def installed():
    assert cpu_compat.install() is True
    assert cpu_compat.install() is True  # idempotent
    assert cpu_compat.is_installed()


def test_cuda_placements_land_on_cpu():
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2, device=0).device.type == "cpu"
    assert torch.arange(4, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.randn(4)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.to("cuda", torch.float64).dtype == torch.float64
    assert torch.tensor([1.0], device="cuda", pin_memory=True).device.type == "cpu"


def test_fast_path_runs_without_the_mode_and_restores_it():
    from megatron.core.transformer.utils import get_default_causal_mask

    with cpu_compat.fast_path():
        # No rewriting in here: a literal CUDA placement fails loudly instead.
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")
        # ... except the causal mask the model's unfused attention builds (patched to CPU).
        assert torch.equal(get_default_causal_mask(3), torch.ones(3, 3, dtype=torch.bool).triu(1))
        with cpu_compat.fast_path():  # nesting is harmless
            pass
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def test_type_names_report_cuda_but_conversions_still_work():
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64


def test_streams_events_synchronize_are_inert():
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pass
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    sum(range(1000))
    end.record()
    end.synchronize()
    assert start.elapsed_time(end) >= 0.0


def _tp_draws(seed: int, tp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(8)
    outside = torch.rand(8)
    return inside, outside


def test_rng_tracker_forks_a_per_tp_rank_stream():
    inside0, outside0 = _tp_draws(7, tp_rank=0)
    inside1, outside1 = _tp_draws(7, tp_rank=1)
    # Megatron's rule: the model-parallel stream is seeded with seed + 2718 + tp_rank.
    for rank, inside in ((0, inside0), (1, inside1)):
        expected = torch.rand(8, generator=torch.Generator().manual_seed(7 + 2718 + rank))
        torch.testing.assert_close(inside, expected, rtol=0, atol=0)
    assert not torch.equal(inside0, inside1)
    # The default stream is untouched by the fork: it continues as if no fork happened.
    torch.manual_seed(7)
    expected_outside = torch.rand(8)
    torch.testing.assert_close(outside0, expected_outside, rtol=0, atol=0)
    torch.testing.assert_close(outside1, expected_outside, rtol=0, atol=0)


def test_rng_tracker_fork_continues_its_stream_and_nests():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(3, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = get_cuda_rng_tracker()
    with tracker.fork():
        a = torch.rand(4)
        with tracker.fork("data-parallel-rng"):
            torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    reference = torch.Generator().manual_seed(3 + 2718)
    torch.testing.assert_close(torch.cat([a, b]), torch.rand(8, generator=reference), rtol=0, atol=0)


def test_recompute_backward_runs_under_the_device_mode():
    from megatron.core.tensor_parallel.random import CheckpointFunction, checkpoint

    assert getattr(CheckpointFunction.backward, "_megarlhf_cpu", False)

    def fn(x):
        # A CUDA allocation inside the recomputed forward (as get_default_causal_mask does).
        return x * torch.ones(x.shape, device="cuda")

    x = torch.randn(5, requires_grad=True)
    checkpoint(fn, False, x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5))
