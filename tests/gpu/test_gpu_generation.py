"""On a GPU: decode steps replayed from a CUDA graph generate what the eager engine does."""

import torch

from tests.parallel.harness import World
from tests.parallel.test_generation import EOS, PAD, PROMPTS, VOCAB


def _generate_both_ways(temperature):
    from megarlhf.models.backbone import build_model
    from megarlhf.rollout.engine import GenerationEngine
    from megarlhf.rollout.sampling import SamplingParams
    from tests.parallel.common import groups, reseed, tiny_config

    g = groups(1, 1)
    reseed(7, g)
    # float32 and the local spec (SDPA attention: the mask a fixed-shape step needs)
    model = build_model(tiny_config("llama", transformer_impl="local"), g).eval()
    params = SamplingParams(max_new_tokens=16, temperature=temperature, top_k=50, top_p=0.9)
    out = {}
    for graphs in (False, True):
        engine = GenerationEngine(model, g, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD, cuda_graphs=graphs)
        r = engine.generate(PROMPTS, params, seeds=[3, 4, 5, 6])
        again = engine.generate(PROMPTS, params, seeds=[3, 4, 5, 6])  # a second capture, same result
        out[graphs] = {"tokens": r.tokens, "logprobs": r.logprobs, "again": again.tokens, "captured": engine.graphs_captured}
    return out


def test_cuda_graph_decode_equals_eager():
    world = World(1)
    try:
        for temperature in (0.0, 0.8):
            res = world.run(_generate_both_ways, temperature)[0]
            eager, graphs = res[False], res[True]
            assert eager["captured"] == 0 and graphs["captured"] == 2
            assert torch.equal(graphs["tokens"], eager["tokens"])
            assert torch.equal(graphs["again"], eager["tokens"])
            torch.testing.assert_close(graphs["logprobs"], eager["logprobs"], atol=1e-5, rtol=0)
    finally:
        world.close()
