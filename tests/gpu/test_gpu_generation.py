"""On a GPU: decode steps replayed from a CUDA graph generate what the eager engine does,
with megarlhf's local spec and with Transformer Engine's (when it imports; its core
attention is replaced by SDPA twins for generation)."""

import pytest
import torch

from tests.parallel.harness import World
from tests.parallel.test_generation import EOS, PAD, PROMPTS, VOCAB


def _generate_both_ways(temperature, impl):
    from megarlhf.models.backbone import build_model
    from megarlhf.rollout.engine import GenerationEngine
    from megarlhf.rollout.sampling import SamplingParams
    from tests.parallel.common import groups, reseed, tiny_config

    g = groups(1, 1)
    reseed(7, g)
    model = build_model(tiny_config("llama", transformer_impl=impl), g).eval()  # float32
    params = SamplingParams(max_new_tokens=16, temperature=temperature, top_k=50, top_p=0.9)
    out = {}
    for graphs in (False, True):
        engine = GenerationEngine(model, g, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD, cuda_graphs=graphs)
        r = engine.generate(PROMPTS, params, seeds=[3, 4, 5, 6])
        again = engine.generate(PROMPTS, params, seeds=[3, 4, 5, 6])  # a second capture, same result
        out[graphs] = {"tokens": r.tokens, "logprobs": r.logprobs, "again": again.tokens, "captured": engine.graphs_captured}
    return out


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_cuda_graph_decode_equals_eager(impl):
    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine")
    world = World(1)
    try:
        for temperature in (0.0, 0.8):
            res = world.run(_generate_both_ways, temperature, impl)[0]
            eager, graphs = res[False], res[True]
            assert eager["captured"] == 0 and graphs["captured"] == 2
            assert torch.equal(graphs["tokens"], eager["tokens"])
            assert torch.equal(graphs["again"], eager["tokens"])
            torch.testing.assert_close(graphs["logprobs"], eager["logprobs"], atol=1e-5, rtol=0)
    finally:
        world.close()


def _graphs_against_full_recompute(impl):
    from megarlhf.rollout.engine import GenerationEngine
    from tests.parallel.test_generation import _model, greedy_case

    model, g = _model(1, "llama", transformer_impl=impl)
    engine = GenerationEngine(model, g, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD, cuda_graphs=True)
    return greedy_case(1, "llama", "fixed_shape", model=(model, g), engine=engine)


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_cuda_graph_greedy_equals_full_recompute(impl):
    """Left-padded prompts of 3-9 tokens, graph-replayed decode (SDPA twins under TE) vs
    each prompt alone through the model's own forward, no cache."""
    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine")
    world = World(1)
    try:
        res = world.run(_graphs_against_full_recompute, impl)[0]
    finally:
        world.close()
    assert res["tokens"] == res["ref_tokens"]
    for got, ref in zip(res["logprobs"], res["ref_logprobs"]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=0)
