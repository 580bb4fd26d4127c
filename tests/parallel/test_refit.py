"""Weight refit between layouts: after an optimizer step on the actor, the engine's copy
holds exactly the new weights and generates what the new weights generate."""

from __future__ import annotations

import pytest
import torch

from megarlhf.config import OptimConfig
from megarlhf.engine.engine import TrainEngine
from megarlhf.models.backbone import build_model
from megarlhf.models.logprobs import logprobs_and_entropy
from megarlhf.parallel import weights
from megarlhf.parallel.refit import WeightRefit
from megarlhf.rollout.engine import GenerationEngine
from megarlhf.rollout.sampling import SamplingParams
from tests.parallel.common import batch, groups, reseed, tiny_config

PROMPTS = [[5, 17, 33], [8, 9, 10, 11, 12], [40, 41]]


def refit_case(actor_layout, engine_layout, dtype="float32"):
    cfg = tiny_config("llama", params_dtype=dtype)
    ga, ge = groups(*actor_layout), groups(*engine_layout)
    reseed(3, ga)
    actor = TrainEngine(build_model(cfg, ga), ga, OptimConfig(learning_rate=1e-2), max_steps=5)
    reseed(4, ge)
    engine_model = build_model(cfg, ge)  # a different init: refit must overwrite all of it
    refit = WeightRefit(actor.module, ga, engine_model, ge)
    refit.refit()

    data = batch(b=4, seed=1)
    local = {k: v.chunk(ga.layout.dp)[ga.dp_rank] for k, v in data.items()}
    n = data["mask"][:, 1:].sum()

    def loss(out, mb):
        lp, _ = logprobs_and_entropy(out[:, :-1], mb["tokens"][:, 1:], tp_group=ga.tp, vocab_size=cfg.vocab_size)
        return -(lp * mb["mask"][:, 1:]).sum() / n, {}

    before = weights.gather_full_state(actor.module, ga)
    actor.train_step([local], loss)
    seconds = refit.refit()
    after = weights.gather_full_state(actor.module, ga)
    got = weights.gather_full_state(engine_model, ge)

    # Oracle for generation: the new weights loaded directly into a model of the engine layout.
    reseed(5, ge)
    direct = build_model(cfg, ge)
    weights.load_full_state(direct, after, ge)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    ours = GenerationEngine(engine_model, ge, vocab_size=cfg.vocab_size, eos_id=1, pad_id=0).generate(PROMPTS, params, [0] * 3)
    ref = GenerationEngine(direct, ge, vocab_size=cfg.vocab_size, eos_id=1, pad_id=0).generate(PROMPTS, params, [0] * 3)
    return {
        "moved": max((after[k] - before[k]).abs().max().item() for k in after),
        "refit_diff": max((got[k] - after[k]).abs().max().item() for k in after),
        "same_tokens": torch.equal(ours.tokens, ref.tokens),
        "seconds": seconds,
    }


@pytest.mark.parametrize(
    "actor_layout,engine_layout",
    [((1, 2), (1, 1)), ((1, 2), (2, 1)), ((2, 1), (1, 1)), ((1, 1), (2, 1))],
    ids=["pp2->tp1", "pp2->tp2", "tp2->tp1", "tp1->tp2"],
)
def test_refit_two_ranks(world2, actor_layout, engine_layout):
    for res in world2.run(refit_case, actor_layout, engine_layout):
        assert res["moved"] > 1e-3  # the optimizer step changed the weights ...
        assert res["refit_diff"] == 0.0  # ... and the engine holds exactly the new ones
        assert res["same_tokens"]


def test_refit_bf16_pp2_to_tp2(world2):
    """bf16 actor and engine copy: refit moves the bf16 weights (the rounded float32 main
    weights) exactly, and the copy generates what they generate."""
    for res in world2.run(refit_case, (1, 2), (2, 1), "bfloat16"):
        assert res["moved"] > 1e-3 and res["refit_diff"] == 0.0 and res["same_tokens"]


def test_refit_tp2pp2_to_tp2(world4):
    for res in world4.run(refit_case, (2, 2), (2, 1)):
        assert res["moved"] > 1e-3 and res["refit_diff"] == 0.0 and res["same_tokens"]


def in_place_case():
    g = groups(2, 1)
    reseed(3, g)
    model = build_model(tiny_config("llama"), g)
    return WeightRefit(model, g, model, g).refit()


def test_same_layout_is_zero_copy(world2):
    assert world2.run(in_place_case) == [0.0, 0.0]
